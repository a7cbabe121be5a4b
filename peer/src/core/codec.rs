//! Little-endian binary records sealed with a CRC32, for the manifest and the store's metadata.
//! Readers return `None` on a short buffer instead of panicking or over-allocating.

use super::Digest;

/// Appends the CRC32 of everything in `buf` to it.
pub fn seal(buf: &mut Vec<u8>) {
    let crc = crc32fast::hash(buf);
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// Checks the trailing CRC32 and returns the body before it.
pub fn unseal(buf: &[u8]) -> Option<&[u8]> {
    let split = buf.len().checked_sub(4)?;
    let (body, crc) = buf.split_at(split);
    (crc32fast::hash(body).to_le_bytes() == crc).then_some(body)
}

pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Some(a)
    }

    pub fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    pub fn digest(&mut self) -> Option<Digest> {
        self.array().map(Digest)
    }

    /// A u16-length-prefixed UTF-8 string.
    pub fn string(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.bytes(n)?.to_vec()).ok()
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// Appends a u16-length-prefixed string, cut at 65535 bytes on a char boundary.
pub fn put_string(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_read_back() {
        let mut b = vec![1u8];
        b.extend_from_slice(&7u64.to_le_bytes());
        put_string(&mut b, "héllo");
        seal(&mut b);
        let body = unseal(&b).unwrap();
        let mut r = Reader::new(body);
        assert_eq!(r.u8(), Some(1));
        assert_eq!(r.u64(), Some(7));
        assert_eq!(r.string().as_deref(), Some("héllo"));
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.u32(), None);
        b[3] ^= 1;
        assert!(unseal(&b).is_none());
        assert!(unseal(&[1, 2]).is_none());
    }

    #[test]
    fn long_strings_are_cut_on_char_boundary() {
        let s = "é".repeat(40_000);
        let mut b = Vec::new();
        put_string(&mut b, &s);
        let got = Reader::new(&b).string().unwrap();
        assert!(got.len() <= 65535 && s.starts_with(&got));
    }
}

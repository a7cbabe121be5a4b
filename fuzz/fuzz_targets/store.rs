//! What a restart reads back from a task directory: the header, the manifest, and the journal
//! replayed against the header's plan (or a fixed one when the header does not decode).
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling::core::{Manifest, PiecePlan};
use starling::storage::{decode_journal, TaskHeader};

fuzz_target!(|data: &[u8]| {
    // One input carries three files: split at the first two 0xFF 0x00 0xFF markers.
    let mut parts = split3(data);
    let (header, manifest, journal) = (parts[0], parts[1], parts[2]);
    let plan = match TaskHeader::decode(header) {
        Ok(h) => {
            assert_eq!(TaskHeader::decode(&h.encode()).ok(), Some(h.clone()));
            h.plan
        }
        Err(_) => PiecePlan::new(1 << 20, 65536).expect("a valid plan"),
    };
    if let Ok(m) = Manifest::decode(manifest) {
        assert_eq!(Manifest::decode(&m.encode()).ok().as_ref(), Some(&m));
        assert_eq!(m.encode().len(), Manifest::encoded_len(m.plan().count()));
    }
    // Each of them alone, too: a lone file is the common damage.
    let _ = Manifest::decode(data);
    let _ = TaskHeader::decode(data);
    if let Ok(links) = decode_journal(journal, &plan) {
        for l in links {
            assert!(l.index < plan.count(), "a journal record outside the plan");
        }
    }
    parts.clear();
});

fn split3(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(3);
    let mut rest = data;
    for _ in 0..2 {
        match rest.windows(3).position(|w| w == [0xFF, 0x00, 0xFF]) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + 3..];
            }
            None => {
                out.push(rest);
                rest = &[];
            }
        }
    }
    out.push(rest);
    out
}

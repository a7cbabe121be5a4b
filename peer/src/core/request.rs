//! What a client asks for, in one type from the command line through the daemon's API to a
//! seed's order: the content's URL, its digest (parsed once, here), origin headers and a piece
//! length. Its JSON form is the API's and the seed order's wire form.

use std::path::PathBuf;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Digest;

/// One content to download.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub url: String,
    /// The whole content's digest, when known: it names the task and is checked at the end.
    #[serde(default)]
    pub digest: Option<Digest>,
    /// Extra headers for the origin (credentials, for example), in order.
    #[serde(default, with = "header_pairs")]
    pub headers: HeaderMap,
    /// Forces a piece length for a new task (validated); None picks it from the length.
    #[serde(default)]
    pub piece_length: Option<u64>,
}

/// A local file to add to the store and seed (`starling import`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Import {
    /// The file, absolute: the daemon reads it with its own permissions.
    pub path: PathBuf,
    /// The digest the content must have, when the caller knows it.
    #[serde(default)]
    pub digest: Option<Digest>,
    /// Piece length (validated); None picks it from the length, as a download would.
    #[serde(default)]
    pub piece_length: Option<u64>,
    /// Hard-link the file into the store instead of copying it. The file must be on the store's
    /// file system; it becomes read-only, and must not change afterwards.
    #[serde(default)]
    pub link: bool,
}

/// Why a header given as text is not one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("header {0:?} must look like 'Name: value'")]
    Shape(String),
    #[error("header {header:?} has an invalid name {name:?}")]
    Name { header: String, name: String },
    #[error("header {0:?} has an invalid value (control characters are not allowed)")]
    Value(String),
}

/// Parses `Name: value` lines (the CLI's `-H`) into a header map.
pub fn parse_headers<S: AsRef<str>>(raw: &[S]) -> Result<HeaderMap, HeaderError> {
    let mut map = HeaderMap::new();
    for h in raw {
        let h = h.as_ref();
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| HeaderError::Shape(h.to_string()))?;
        let (k, v) = (k.trim(), v.trim());
        let (name, value) = header(k, v).map_err(|e| match e {
            HeaderError::Name { name, .. } => HeaderError::Name {
                header: h.to_string(),
                name,
            },
            _ => HeaderError::Value(h.to_string()),
        })?;
        map.append(name, value);
    }
    Ok(map)
}

/// One header from its name and value.
pub fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), HeaderError> {
    let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| HeaderError::Name {
        header: format!("{name}: {value}"),
        name: name.to_string(),
    })?;
    let v = HeaderValue::from_str(value).map_err(|_| HeaderError::Value(name.to_string()))?;
    Ok((n, v))
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A header map as `[["Name", "value"], ...]`: the order and repeated names are kept, and every
/// name and value is checked when read.
mod header_pairs {
    use super::*;

    /// Values as UTF-8, not only visible ASCII: a value given as `X: é` (read from JSON or a
    /// command line, so always UTF-8) survives the trip to the daemon. (Found by fuzzing:
    /// `to_str` dropped such headers silently.)
    pub fn serialize<S: Serializer>(h: &HeaderMap, s: S) -> Result<S::Ok, S::Error> {
        let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(h.len());
        for (k, v) in h {
            let v = std::str::from_utf8(v.as_bytes()).map_err(|_| {
                serde::ser::Error::custom(format!("header {k} has a value that is not UTF-8"))
            })?;
            pairs.push((k.as_str(), v));
        }
        pairs.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HeaderMap, D::Error> {
        let pairs = Vec::<(String, String)>::deserialize(d)?;
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            let (k, v) = header(&k, &v).map_err(serde::de::Error::custom)?;
            map.append(k, v);
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_header_values_survive_json() {
        let r = Request {
            url: "http://h/x".into(),
            headers: parse_headers(&["X-Name: é ü", "Authorization: Bearer t"]).unwrap(),
            ..Request::default()
        };
        let back: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn headers_parse_and_reject() {
        let h = parse_headers(&["Authorization: Bearer x", "X-A:1", "X-A: 2"]).unwrap();
        assert_eq!(h["authorization"], "Bearer x");
        assert_eq!(h.get_all("x-a").iter().count(), 2);
        assert!(matches!(
            parse_headers(&["nocolon"]),
            Err(HeaderError::Shape(_))
        ));
        assert!(matches!(
            parse_headers(&["bad name: v"]),
            Err(HeaderError::Name { .. })
        ));
        assert!(matches!(
            parse_headers(&["X: a\u{1}b"]),
            Err(HeaderError::Value(_))
        ));
    }

    #[test]
    fn a_request_round_trips_as_the_apis_json() {
        let req = Request {
            url: "https://example.com/a".into(),
            digest: Some(Digest::of(b"x")),
            headers: parse_headers(&["Authorization: Bearer t", "X-A: 1"]).unwrap(),
            piece_length: Some(1 << 20),
        };
        let json = serde_json::to_string(&req).unwrap();
        // The same shape the API had before: the digest as text, headers as pairs.
        assert!(json.contains(&format!("\"digest\":\"{}\"", Digest::of(b"x"))));
        assert!(json.contains("[\"authorization\",\"Bearer t\"]"));
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
    }

    #[test]
    fn bad_digests_and_headers_are_refused_when_read() {
        let e = serde_json::from_str::<Request>(r#"{"url":"u","digest":"md5:00"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only sha256"), "{e}");
        let e = serde_json::from_str::<Request>(r#"{"url":"u","headers":[["bad name","v"]]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid name"), "{e}");
        // Optional fields may be left out.
        let r: Request = serde_json::from_str(r#"{"url":"u"}"#).unwrap();
        assert_eq!((r.digest, r.piece_length, r.headers.len()), (None, None, 0));
    }
}

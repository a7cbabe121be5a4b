//! Task identity. A content named by its digest has exactly one task ID, the digest, whichever
//! URL it came through. Otherwise the ID is the SHA-256 of the normalised URL.

use std::fmt;

use url::Url;

use super::Digest;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskKind {
    /// Named by the content's own digest.
    Content,
    /// Named by the SHA-256 of a normalised URL.
    Url,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId {
    pub kind: TaskKind,
    pub hash: Digest,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskIdError {
    #[error("URL {input:?} is not valid: {reason}")]
    BadUrl {
        input: String,
        reason: url::ParseError,
    },
    #[error("URL {input:?} has scheme {scheme:?}; only http and https are supported")]
    UnsupportedScheme { input: String, scheme: String },
    #[error("{0:?} is not a task directory name (expected sha256-<hex> or url-<hex>)")]
    BadDirName(String),
}

/// Normalises a URL for task identity: lower-case scheme and host, default port dropped,
/// credentials and fragment dropped, query parameters named in `filtered` (case-insensitive)
/// removed, and the remaining parameters sorted so their order does not matter.
pub fn normalize_url(input: &str, filtered: &[String]) -> Result<Url, TaskIdError> {
    let mut url = Url::parse(input).map_err(|reason| TaskIdError::BadUrl {
        input: input.to_string(),
        reason,
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(TaskIdError::UnsupportedScheme {
            input: input.to_string(),
            scheme: url.scheme().to_string(),
        });
    }
    url.set_fragment(None);
    // Both calls only fail for URLs that cannot have credentials, which http(s) always can.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !filtered.iter().any(|f| f.eq_ignore_ascii_case(k)))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    pairs.sort();
    if pairs.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    Ok(url)
}

impl TaskId {
    pub fn for_content(digest: Digest) -> TaskId {
        TaskId {
            kind: TaskKind::Content,
            hash: digest,
        }
    }

    pub fn for_url(input: &str, filtered: &[String]) -> Result<TaskId, TaskIdError> {
        let url = normalize_url(input, filtered)?;
        Ok(TaskId {
            kind: TaskKind::Url,
            hash: Digest::of(url.as_str().as_bytes()),
        })
    }

    /// The ID for a download: the digest when one is known, else the URL's.
    pub fn resolve(
        input: &str,
        digest: Option<Digest>,
        filtered: &[String],
    ) -> Result<TaskId, TaskIdError> {
        // Validate the URL even when the digest names the task: a bad URL is still an error.
        let by_url = TaskId::for_url(input, filtered)?;
        Ok(digest.map(TaskId::for_content).unwrap_or(by_url))
    }

    /// A file-system-safe name, also accepted back by [`TaskId::from_dir_name`].
    pub fn dir_name(&self) -> String {
        match self.kind {
            TaskKind::Content => format!("sha256-{}", self.hash.hex()),
            TaskKind::Url => format!("url-{}", self.hash.hex()),
        }
    }

    pub fn from_dir_name(name: &str) -> Result<TaskId, TaskIdError> {
        let bad = || TaskIdError::BadDirName(name.to_string());
        let (kind, hex) = if let Some(h) = name.strip_prefix("sha256-") {
            (TaskKind::Content, h)
        } else if let Some(h) = name.strip_prefix("url-") {
            (TaskKind::Url, h)
        } else {
            return Err(bad());
        };
        Ok(TaskId {
            kind,
            hash: Digest::from_hex(hex).ok_or_else(bad)?,
        })
    }
}

/// On the wire (scheduler JSON) a task ID is its directory name: `sha256-<hex>` or `url-<hex>`.
impl serde::Serialize for TaskId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.dir_name())
    }
}

impl<'de> serde::Deserialize<'de> for TaskId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TaskId, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        TaskId::from_dir_name(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            TaskKind::Content => write!(f, "{}", self.hash),
            TaskKind::Url => write!(f, "url:{}", self.hash.hex()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> Vec<String> {
        Vec::new()
    }

    #[test]
    fn normalisation_merges_equivalent_urls() {
        let filt = vec!["X-Amz-Signature".to_string(), "Expires".to_string()];
        let a = TaskId::for_url("HTTP://Example.COM:80/a/b?z=1&a=2#frag", &filt).unwrap();
        let b = TaskId::for_url("http://user:pw@example.com/a/b?a=2&z=1", &filt).unwrap();
        let c = TaskId::for_url(
            "http://example.com/a/b?a=2&x-amz-signature=abc&z=1&Expires=9",
            &filt,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        let d = TaskId::for_url("http://example.com/a/b?a=3&z=1", &filt).unwrap();
        assert_ne!(a, d);
        let e = TaskId::for_url("https://example.com/a/b?a=2&z=1", &filt).unwrap();
        assert_ne!(a, e);
    }

    #[test]
    fn digest_wins_over_url() {
        let d = Digest::of(b"x");
        let t1 = TaskId::resolve("http://a/x", Some(d), &none()).unwrap();
        let t2 = TaskId::resolve("http://b/y?tag=1", Some(d), &none()).unwrap();
        assert_eq!(t1, t2);
        assert_eq!(t1.to_string(), d.to_string());
        assert!(TaskId::resolve("not a url", Some(d), &none()).is_err());
    }

    #[test]
    fn dir_names_round_trip() {
        let t = TaskId::for_url("http://a/x", &none()).unwrap();
        assert_eq!(TaskId::from_dir_name(&t.dir_name()).unwrap(), t);
        let c = TaskId::for_content(Digest::of(b"y"));
        assert_eq!(TaskId::from_dir_name(&c.dir_name()).unwrap(), c);
        assert!(TaskId::from_dir_name("sha256-zz").is_err());
        assert!(TaskId::from_dir_name("../etc").is_err());
    }

    #[test]
    fn rejects_other_schemes() {
        assert!(matches!(
            TaskId::for_url("ftp://a/x", &none()),
            Err(TaskIdError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            TaskId::for_url("nope", &none()),
            Err(TaskIdError::BadUrl { .. })
        ));
    }
}

//! The Hugging Face cache layout, as `huggingface_hub` writes and reads it:
//!
//! ```text
//! <cache>/models--ORG--REPO/
//!     blobs/<etag>                      the files' bytes (etag: SHA-256, or git blob ID)
//!     snapshots/<commit>/<path>         relative symlinks to ../../blobs/<etag>
//!     refs/<revision>                   the commit a branch or tag pointed at
//! ```
//!
//! transformers, vLLM and `huggingface_hub` with `HF_HUB_OFFLINE=1` load from it unchanged.
//! A blob is written under a temporary name and renamed, so a reader never sees half a file.

use std::io;
use std::path::{Path, PathBuf};

use super::{hf_home, HubRef, RepoKind};

/// `HF_HUB_CACHE`, else `$HF_HOME/hub` (`~/.cache/huggingface/hub`).
pub fn default_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => hf_home().join("hub"),
    }
}

/// One repository's folder in the cache.
pub struct CacheRepo {
    root: PathBuf,
}

impl CacheRepo {
    /// `<cache>/<kind>s--ORG--REPO`, created with its `blobs`, `snapshots` and `refs`.
    pub fn open(cache: &Path, r: &HubRef) -> io::Result<CacheRepo> {
        let kind = match r.kind {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
            RepoKind::Space => "spaces",
        };
        let root = cache.join(format!("{kind}--{}", r.repo.replace('/', "--")));
        for d in ["blobs", "snapshots", "refs"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        Ok(CacheRepo { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    /// Where a blob is written before it is renamed into place; `n` tells apart two files of
    /// one download with the same content.
    pub fn incomplete_path(&self, etag: &str, n: usize) -> PathBuf {
        self.root
            .join("blobs")
            .join(format!("{etag}.{}.{n}.incomplete", std::process::id()))
    }

    /// True when the blob is there with this size (a cached file is not fetched again).
    pub fn has_blob(&self, etag: &str, size: u64) -> bool {
        std::fs::metadata(self.blob_path(etag)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// `snapshots/<commit>/<path>` → `../../blobs/<etag>` (one `..` per folder level), replacing
    /// what was there.
    pub fn link(&self, commit: &str, path: &str, etag: &str) -> io::Result<PathBuf> {
        let at = self.root.join("snapshots").join(commit).join(path);
        if let Some(dir) = at.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let depth = path.split('/').count() + 1;
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        match std::fs::symlink_metadata(&at) {
            Ok(_) => std::fs::remove_file(&at)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::os::unix::fs::symlink(&target, &at)?;
        Ok(at)
    }

    /// `refs/<revision>` = commit, unless the revision is the commit itself.
    pub fn set_ref(&self, revision: &str, commit: &str) -> io::Result<()> {
        if revision == commit {
            return Ok(());
        }
        let at = self.root.join("refs").join(revision);
        if let Some(dir) = at.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = at.with_extension("starling-tmp");
        std::fs::write(&tmp, commit)?;
        std::fs::rename(&tmp, &at)
    }

    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_huggingface_hub() {
        let d = tempfile::tempdir().unwrap();
        let r: HubRef = "hf://Org/Model".parse().unwrap();
        let c = CacheRepo::open(d.path(), &r).unwrap();
        assert!(c.root().ends_with("models--Org--Model"));
        std::fs::write(c.blob_path("abc"), b"x").unwrap();
        let at = c.link("c0ffee", "sub/dir/w.safetensors", "abc").unwrap();
        assert_eq!(
            std::fs::read_link(&at).unwrap(),
            Path::new("../../../../blobs/abc")
        );
        assert_eq!(std::fs::read(&at).unwrap(), b"x");
        c.link("c0ffee", "sub/dir/w.safetensors", "abc").unwrap();
        c.set_ref("main", "c0ffee").unwrap();
        assert_eq!(
            std::fs::read_to_string(c.root().join("refs/main")).unwrap(),
            "c0ffee"
        );
        assert!(c.has_blob("abc", 1));
        assert!(!c.has_blob("abc", 2));
    }
}

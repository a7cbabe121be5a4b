//! Puts a verified content at the user's output path. The output appears only complete: it is
//! made under a temporary name in the same directory, then renamed over the target. It is a
//! reflink (copy-on-write clone) where the file system can, else a hard link to the stored
//! content (which the store keeps read-only), else a copy.

use std::fs::File;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    Reflink,
    HardLink,
    Copy,
}

impl std::fmt::Display for Placed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placed::Reflink => "reflink",
            Placed::HardLink => "hard link",
            Placed::Copy => "copy",
        })
    }
}

/// Places `content` at `out`. With `allow_hard_link` false the output never shares an inode
/// with the store (a reflink still may: it is copy-on-write).
pub fn place(content: &Path, out: &Path, allow_hard_link: bool) -> io::Result<Placed> {
    let name = out.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "output path has no file name")
    })?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.starling-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let placed = make(content, &tmp, allow_hard_link);
    let res = placed.and_then(|p| std::fs::rename(&tmp, out).map(|()| p));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

fn make(content: &Path, tmp: &Path, allow_hard_link: bool) -> io::Result<Placed> {
    let _ = std::fs::remove_file(tmp);
    if reflink(content, tmp).is_ok() {
        return Ok(Placed::Reflink);
    }
    let _ = std::fs::remove_file(tmp);
    if allow_hard_link && std::fs::hard_link(content, tmp).is_ok() {
        return Ok(Placed::HardLink);
    }
    std::fs::copy(content, tmp)?;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o644))?;
    Ok(Placed::Copy)
}

fn reflink(src: &Path, dst: &Path) -> io::Result<()> {
    let s = File::open(src)?;
    let d = File::options()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(dst)?;
    rustix::fs::ioctl_ficlone(&d, &s).map_err(io::Error::from)
}

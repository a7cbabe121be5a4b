//! `cargo xtask image`: the container image, written directly as an OCI image layout (no
//! Dockerfile, no daemon, no network), in one tar that both `docker load` and
//! `ctr images import` take.
//!
//! One layer, from scratch: the `starling` binary (debug info stripped), the eBPF object beside
//! it (where the daemon looks), the C libraries the binary links (from `ldd`: glibc, libgcc_s,
//! libm and the loader), the CA bundle for HTTPS origins, a minimal `/etc/passwd`, `/etc/group`
//! and `nsswitch.conf`, and empty `/tmp`, `/etc/starling` and `/var/lib/starling`. No shell.
//! The tar is reproducible: entries sorted, owner root, times zero.
//!
//! The entrypoint is `starling`, the default command `daemon`; the chart passes its own.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use ring::digest::{digest, SHA256};

use crate::{cargo, root, sh};

#[derive(clap::Args)]
pub struct Args {
    /// Use the debug build (faster to build; the tests use it). Default: release.
    #[arg(long)]
    pub debug: bool,
    /// Directory for the image tar. Default: target/image.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The image's name. Default: starling:<version>.
    #[arg(long)]
    pub name: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let out = a.out.unwrap_or_else(|| root().join("target/image"));
    let name = a
        .name
        .unwrap_or_else(|| format!("starling:{}", env!("CARGO_PKG_VERSION")));
    let profile = if a.debug { "debug" } else { "release" };
    let mut cmd = cargo();
    cmd.args(["build", "--package", "starling", "--bin", "starling"]);
    if !a.debug {
        cmd.arg("--release");
    }
    sh(&mut cmd)?;
    crate::build_ebpf()?;
    let bin_dir = root().join("target").join(profile);
    let image = build(&bin_dir, &out, &name)?;
    println!(
        "image {name}: {} ({} MiB); load it with `docker load -i` or `ctr images import`",
        image.display(),
        std::fs::metadata(&image)?.len() >> 20
    );
    Ok(())
}

/// A file in the image: its path there, mode, and content.
struct Entry {
    mode: u32,
    content: Option<Vec<u8>>,
}

/// Builds the image from the binary and eBPF object in `bin_dir`; returns the tar's path.
fn build(bin_dir: &Path, out: &Path, name: &str) -> Result<PathBuf> {
    let bin = bin_dir.join("starling");
    let mut files: BTreeMap<String, Entry> = BTreeMap::new();
    let mut add = |path: &str, mode: u32, content: Option<Vec<u8>>| {
        // Every parent directory is an entry too.
        let mut dir = Path::new(path).parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            files
                .entry(d.to_string_lossy().into_owned())
                .or_insert(Entry {
                    mode: 0o755,
                    content: None,
                });
            dir = d.parent();
        }
        files.insert(path.to_string(), Entry { mode, content });
    };
    add("usr/local/bin/starling", 0o755, Some(stripped(&bin)?));
    let obj = bin_dir.join("starling-probes.bpf.o");
    add(
        "usr/local/bin/starling-probes.bpf.o",
        0o644,
        Some(std::fs::read(&obj).with_context(|| format!("{}", obj.display()))?),
    );
    for lib in linked_libraries(&bin)? {
        let content = std::fs::read(&lib).with_context(|| format!("{}", lib.display()))?;
        add(
            lib.to_string_lossy().trim_start_matches('/'),
            0o755,
            Some(content),
        );
    }
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    add(
        "etc/ssl/certs/ca-certificates.crt",
        0o644,
        Some(std::fs::read(bundle).context("the CA bundle (apt: ca-certificates)")?),
    );
    add("etc/passwd", 0o644, Some(b"root:x:0:0:root:/root:/nonexistent\nnobody:x:65534:65534:nobody:/nonexistent:/nonexistent\n".to_vec()));
    add(
        "etc/group",
        0o644,
        Some(b"root:x:0:\nnogroup:x:65534:\n".to_vec()),
    );
    add(
        "etc/nsswitch.conf",
        0o644,
        Some(b"hosts: files dns\n".to_vec()),
    );
    add("tmp", 0o1777, None);
    add("etc/starling", 0o755, None);
    add("var/lib/starling", 0o755, None);
    add("root", 0o700, None);

    let layer_tar = tar_of(&files)?;
    let diff_id = sha256(&layer_tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer_tar)?;
    let layer = gz.finish()?;
    let version = env!("CARGO_PKG_VERSION");
    let labels = serde_json::json!({
        "org.opencontainers.image.title": "starling",
        "org.opencontainers.image.description": "Peer-to-peer distribution of container images and large artifacts",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.licenses": "Apache-2.0",
    });
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": ["/usr/local/bin/starling"],
            "Cmd": ["daemon"],
            "Env": [
                "PATH=/usr/local/bin",
                "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
            ],
            "WorkingDir": "/",
            "StopSignal": "SIGTERM",
            "Labels": labels,
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image" }],
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": sha256(&layer),
            "size": layer.len(),
        }],
        "annotations": labels,
    }))?;
    let full_name = full_reference(name);
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(&manifest),
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": full_name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;
    let blob = |b: &[u8]| format!("blobs/sha256/{}", &sha256(b)["sha256:".len()..]);
    // Docker's own archive manifest, beside the OCI index, as `docker save` writes both.
    let docker = serde_json::to_vec(&serde_json::json!([{
        "Config": blob(&config),
        "RepoTags": [name],
        "Layers": [blob(&layer)],
    }]))?;
    let mut outer: BTreeMap<String, Entry> = BTreeMap::new();
    let mut put = |path: String, content: Vec<u8>| {
        outer.insert(
            path,
            Entry {
                mode: 0o644,
                content: Some(content),
            },
        );
    };
    put(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    put("index.json".into(), index);
    put("manifest.json".into(), docker);
    put(blob(&config), config.clone());
    put(blob(&manifest), manifest.clone());
    put(blob(&layer), layer.clone());
    for d in ["blobs", "blobs/sha256"] {
        outer.insert(
            d.into(),
            Entry {
                mode: 0o755,
                content: None,
            },
        );
    }
    std::fs::create_dir_all(out)?;
    let path = out.join("starling-image.tar");
    std::fs::write(&path, tar_of(&outer)?).with_context(|| format!("{}", path.display()))?;
    Ok(path)
}

/// `docker.io/library/starling:0.1.0` for `starling:0.1.0` (containerd names images in full).
fn full_reference(name: &str) -> String {
    let first = name.split('/').next().unwrap_or_default();
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_registry {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    }
}

fn sha256(b: &[u8]) -> String {
    let d = digest(&SHA256, b);
    let hex: String = d.as_ref().iter().map(|x| format!("{x:02x}")).collect();
    format!("sha256:{hex}")
}

/// The binary without its debug sections (symbols stay, for backtraces).
fn stripped(bin: &Path) -> Result<Vec<u8>> {
    let tmp = bin.with_extension("image-stripped");
    sh(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(bin)
        .arg(&tmp))?;
    let b = std::fs::read(&tmp)?;
    let _ = std::fs::remove_file(&tmp);
    Ok(b)
}

/// The shared libraries `bin` links, and its loader, as `ldd` names them.
fn linked_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().context("run ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim().split(' ').next().unwrap_or_default(),
            None => line.split(' ').next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("{} links a library that is missing: {line}", bin.display());
        }
    }
    Ok(libs)
}

/// A reproducible tar of `files` (paths without a leading slash; sorted; root-owned; mtime 0).
fn tar_of(files: &BTreeMap<String, Entry>) -> Result<Vec<u8>> {
    let mut t = tar::Builder::new(Vec::new());
    for (path, e) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match &e.content {
            Some(c) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(c.len() as u64);
                t.append_data(&mut h, path, c.as_slice())?;
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                t.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
        }
    }
    Ok(t.into_inner()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_completed_as_containerd_does() {
        assert_eq!(
            full_reference("starling:0.1.0"),
            "docker.io/library/starling:0.1.0"
        );
        assert_eq!(
            full_reference("acme/starling:1"),
            "docker.io/acme/starling:1"
        );
        assert_eq!(
            full_reference("ghcr.io/acme/starling:1"),
            "ghcr.io/acme/starling:1"
        );
        assert_eq!(full_reference("localhost:5000/s:1"), "localhost:5000/s:1");
    }
}

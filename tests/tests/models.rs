//! Models from the Hugging Face Hub and S3, through the real binary: `get hf://` into a folder
//! and into the Hugging Face cache (read back offline by the real `huggingface_hub`), the
//! `HF_ENDPOINT` mirror used by `huggingface_hub` on two nodes, a Hub that lies about a file's
//! SHA-256, a revision that moves mid-download, and `get s3://` against Garage, a real
//! S3-compatible store.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use starling_tests::hub::{safetensors_like, HubProc, RepoBuilder};
use starling_tests::{
    free_port, random_bytes, sha256_bytes, sha256_file, wait_until, Cluster, Daemon, Run, Scratch,
};

fn hub_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_starling-hub"))
}

/// The files of the test model: small ones (plain git files) and LFS ones.
fn model_files(big: usize) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "config.json",
            br#"{"architectures": ["TestModel"], "hidden_size": 64}"#.to_vec(),
        ),
        ("tokenizer.json", random_bytes(40 * 1024, 7)),
        (
            "nested/generation_config.json",
            b"{\"do_sample\": false}\n".to_vec(),
        ),
        (
            "model-00001-of-00002.safetensors",
            safetensors_like(24 << 20, 1),
        ),
        ("model-00002-of-00002.safetensors", safetensors_like(big, 2)),
    ]
}

fn lfs_total(files: &[(&str, Vec<u8>)]) -> u64 {
    files
        .iter()
        .filter(|(p, b)| p.ends_with(".safetensors") || b.len() >= 64 * 1024)
        .map(|(_, b)| b.len() as u64)
        .sum()
}

/// The Hub's storage sent each LFS byte once: `lfs` bytes, plus the one-byte probe (a ranged
/// GET of byte 0, which learns the length and validator) of each of the `files` LFS files.
fn assert_lfs_once(hub: &HubProc, lfs: u64, files: u64) {
    let sent = hub.stat("lfs_bytes");
    assert!(
        (lfs..=lfs + files).contains(&sent),
        "the Hub's storage sent {sent} LFS bytes for {lfs} bytes of LFS files"
    );
}

fn python(script: &str, envs: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new("python3");
    c.arg("-c").arg(script);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.env_remove("HF_TOKEN");
    let out = c.output().expect("run python3");
    let probe = Command::new("python3")
        .args(["-c", "import huggingface_hub"])
        .output()
        .expect("python3");
    assert!(
        probe.status.success(),
        "huggingface_hub is not installed: run `cargo xtask setup` (pip install huggingface_hub)"
    );
    out
}

/// Checks every file of `files` under `dir` against its bytes.
fn same_files(dir: &Path, files: &[(&str, Vec<u8>)]) {
    for (p, b) in files {
        let at = dir.join(p);
        assert_eq!(
            sha256_file(&at),
            sha256_bytes(b),
            "{} differs from the Hub's file",
            at.display()
        );
    }
}

/// A private repository (token required) with a 1 GiB + 4 KiB file: `get hf:// -O DIR`
/// through a daemon, then `--hf-cache` from the store, then the real `huggingface_hub` finds
/// every file offline. The Hub's storage sends each LFS byte once, and never sees the token.
#[test]
fn a_hub_repository_lands_in_a_folder_and_in_the_cache_that_huggingface_hub_reads_offline() {
    let root = tempfile::tempdir().unwrap();
    let files = model_files((1 << 30) + 4096);
    let repo = RepoBuilder::new(root.path(), "acme/tiny-llm");
    let commit = repo.commit(&files);
    repo.set_ref("main", &commit);
    repo.set_token("hf_secret");
    let hub = HubProc::start(&hub_bin(), root.path(), None, "127.0.0.1", 2);
    let s = Scratch::new();
    s.write_config(&format!("[hf]\nendpoint = \"{}\"\n", hub.url()));
    let d = Daemon::start(&s);

    // Without the token: refused, with the hint.
    let out = s.out_dir().join("model");
    let r = Run::of(
        s.starling()
            .args(["get", "hf://acme/tiny-llm", "-O"])
            .arg(&out)
            .env_remove("HF_TOKEN"),
    )
    .fails_with(3);
    assert!(r.stderr.contains("HF_TOKEN"), "{}", r.stderr);

    let r = Run::of(
        s.starling()
            .args(["get", "hf://acme/tiny-llm", "-O"])
            .arg(&out)
            .env("HF_TOKEN", "hf_secret"),
    )
    .ok();
    assert!(r.stderr.contains("saved 5 file(s)"), "{}", r.stderr);
    same_files(&out, &files);
    let lfs = lfs_total(&files);
    assert_lfs_once(&hub, lfs, 2);
    // Each file's resolve URL is asked about once or twice (the probe, and a small file's one
    // piece); the LFS pieces go to the storage URL it redirected to, not through the Hub.
    let resolves = hub.stat("resolves");
    assert!(
        resolves <= 2 * files.len() as u64 + 2,
        "{resolves} resolve requests"
    );
    assert_eq!(
        hub.stat("cdn_auth_seen"),
        0,
        "the token never goes to the storage backend"
    );
    // LFS files are tasks named by their SHA-256.
    let tasks: Vec<String> = s
        .tasks()
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for (p, b) in &files[3..] {
        assert!(
            tasks.contains(&sha256_bytes(b).replace("sha256:", "sha256-")),
            "{p} is not a content task: {tasks:?}"
        );
    }

    // One file, into the cache; then all of them: nothing more from the Hub.
    let cache = s.path().join("hf-cache");
    Run::of(
        s.starling()
            .args([
                "get",
                "hf://acme/tiny-llm/nested/generation_config.json",
                "--hf-cache",
            ])
            .arg(&cache)
            .env("HF_TOKEN", "hf_secret"),
    )
    .ok();
    let r = Run::of(
        s.starling()
            .args(["get", "hf://acme/tiny-llm", "--hf-cache"])
            .arg(&cache)
            .env("HF_TOKEN", "hf_secret"),
    )
    .ok();
    assert!(r.stderr.contains("snapshot at"), "{}", r.stderr);
    assert_lfs_once(&hub, lfs, 2);
    let snap = cache.join("models--acme--tiny-llm/snapshots").join(&commit);
    same_files(&snap, &files);
    assert_eq!(
        std::fs::read_to_string(cache.join("models--acme--tiny-llm/refs/main")).unwrap(),
        commit
    );

    // The real client, offline, finds the snapshot and every file in it.
    let expected: Vec<String> = files
        .iter()
        .map(|(p, b)| format!("{p:?}: {:?}", sha256_bytes(b).replace("sha256:", "")))
        .collect();
    let script = format!(
        r#"
import hashlib, os
from huggingface_hub import snapshot_download, hf_hub_download
want = {{{}}}
p = snapshot_download("acme/tiny-llm", cache_dir={cache:?})
for name, sha in want.items():
    h = hashlib.sha256()
    with open(os.path.join(p, name), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    assert h.hexdigest() == sha, name
hf_hub_download("acme/tiny-llm", "config.json", cache_dir={cache:?})
print("offline ok", p)
"#,
        expected.join(", "),
        cache = cache.display().to_string(),
    );
    let o = python(&script, &[("HF_HUB_OFFLINE", "1")]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("offline ok"),
        "huggingface_hub offline: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    drop(d);
}

/// `HF_ENDPOINT` pointed at a daemon's mirror: the unchanged `huggingface_hub` downloads a
/// model on two nodes; the Hub's storage sends the model once, the second node's copy comes
/// from the first, and every file is right.
#[test]
fn huggingface_hub_through_the_mirror_on_two_nodes_costs_the_hub_one_copy() {
    let root = tempfile::tempdir().unwrap();
    let files = model_files(96 << 20);
    let repo = RepoBuilder::new(root.path(), "acme/mirror-model");
    let commit = repo.commit(&files);
    repo.set_ref("main", &commit);
    let hub = HubProc::start(&hub_bin(), root.path(), None, "127.0.0.1", 50);
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let mut c = Cluster::new_each(1, "", &|i| {
        format!(
            "[hf]\nendpoint = \"{}\"\n[proxy]\nlisten = \"127.0.0.1:{}\"\n",
            hub.url(),
            ports[i]
        )
    });
    c.start_all();
    let lfs = lfs_total(&files);
    for (i, port) in ports.iter().enumerate() {
        let cache = c.dir.path().join(format!("cache{i}"));
        let script = format!(
            r#"
from huggingface_hub import snapshot_download
print(snapshot_download("acme/mirror-model", cache_dir={:?}))
"#,
            cache.display().to_string()
        );
        let endpoint = format!("http://127.0.0.1:{port}");
        let o = python(
            &script,
            &[("HF_ENDPOINT", &endpoint), ("HF_HUB_DISABLE_XET", "1")],
        );
        assert!(
            o.status.success(),
            "huggingface_hub through node {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let snap = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string());
        assert!(snap.ends_with(&commit), "{}", snap.display());
        same_files(&snap, &files);
    }
    assert_lfs_once(&hub, lfs, 2);
    let from_peers = c.nodes[1].metric("starling_bytes_downloaded_total{source=\"parent\"}");
    assert!(
        from_peers >= lfs as f64,
        "node 1 took the model from its peer ({from_peers} bytes)"
    );
}

/// The Hub lists a SHA-256 that the file's bytes do not have. `get` fails with exit code 4 and
/// saves nothing; through the mirror, `huggingface_hub` never gets the file complete.
#[test]
fn a_file_that_does_not_match_its_listed_sha256_never_reaches_a_client_complete() {
    let root = tempfile::tempdir().unwrap();
    let files = model_files(8 << 20);
    let repo = RepoBuilder::new(root.path(), "acme/liar");
    let commit = repo.commit(&files);
    repo.set_ref("main", &commit);
    repo.lie("model-00002-of-00002.safetensors", &"0".repeat(64));
    let hub = HubProc::start(&hub_bin(), root.path(), None, "127.0.0.1", 50);
    let port = free_port();
    let s = Scratch::new();
    s.write_config(&format!(
        "[hf]\nendpoint = \"{}\"\n[proxy]\nlisten = \"127.0.0.1:{port}\"\n",
        hub.url()
    ));
    let d = Daemon::start(&s);
    let out = s.out_dir().join("liar");
    let r = Run::of(s.starling().args(["get", "hf://acme/liar", "-O"]).arg(&out)).fails_with(4);
    assert!(r.stderr.contains("sha256:0000"), "{}", r.stderr);
    assert!(
        !out.join("model-00002-of-00002.safetensors").exists(),
        "nothing wrong is saved"
    );

    let cache = s.path().join("pycache");
    let script = format!(
        r#"
from huggingface_hub import hf_hub_download
hf_hub_download("acme/liar", "model-00002-of-00002.safetensors", cache_dir={:?})
"#,
        cache.display().to_string()
    );
    let o = python(
        &script,
        &[
            ("HF_ENDPOINT", &format!("http://127.0.0.1:{port}")),
            ("HF_HUB_DISABLE_XET", "1"),
            ("HF_HUB_ETAG_TIMEOUT", "30"),
        ],
    );
    assert!(!o.status.success(), "the lying file must not download");
    let complete = walk(&cache)
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with(".incomplete"))
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == files[4].1.len() as u64))
        .count();
    assert_eq!(complete, 0, "no complete copy in the client's cache");
    drop(d);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// `main` moves to a new commit while a download runs: the files saved are all of the commit
/// pinned at the start, with a warning naming both; when the old commit disappears too, the
/// download fails and says the revision moved.
#[test]
fn a_revision_that_moves_mid_download_is_detected_and_reported() {
    let root = tempfile::tempdir().unwrap();
    let files = model_files(48 << 20);
    let repo = RepoBuilder::new(root.path(), "acme/moving");
    let old = repo.commit(&files);
    repo.set_ref("main", &old);
    let mut newer = files.clone();
    newer[0].1 = br#"{"architectures": ["TestModel"], "hidden_size": 128}"#.to_vec();
    let new = repo.commit(&newer);
    // 16 MB/s per response: the 48 MiB file takes a few seconds.
    let hub = HubProc::start_paced(&hub_bin(), root.path(), None, "127.0.0.1", 50, 16 << 20);
    for remove_old in [false, true] {
        // A fresh store each time: nothing found locally.
        let s = Scratch::new();
        s.write_config(&format!(
            "[hf]\nendpoint = \"{}\"\nconcurrency = 1\n[source]\nconcurrency = 1\nbackoff_ms = 20\nattempts = 2\n",
            hub.url()
        ));
        repo.set_ref("main", &old);
        let out = s.out_dir().join(format!("moving-{remove_old}"));
        let child = s
            .starling()
            .args(["get", "hf://acme/moving", "--no-daemon", "-O"])
            .arg(&out)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = child;
        let before = hub.stat("lfs_bytes");
        wait_until(Duration::from_secs(60), "the download to start", || {
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("the get ended early ({st}): {err}");
            }
            hub.stat("lfs_bytes") > before + (1 << 20)
        });
        repo.set_ref("main", &new);
        if remove_old {
            // Its history rewritten: the old commit's files are gone.
            repo.remove_commit(&old);
        }
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("moved from {old} to {new}")),
            "remove_old={remove_old}: {err}"
        );
        if remove_old {
            assert!(!o.status.success(), "{err}");
            assert!(err.contains("run the command again"), "{err}");
        } else {
            assert!(o.status.success(), "{err}");
            same_files(&out, &files);
        }
    }
}

/// Garage, a real S3-compatible store: objects uploaded with a SHA-256 checksum become tasks
/// named by it; one without is a URL task. A single object goes to a file, a prefix to a
/// folder; a second node takes them from the first; wrong credentials are refused clearly.
#[test]
fn s3_objects_from_garage_by_checksum_and_by_url() {
    let g = starling_tests::garage::Garage::start();
    g.create_bucket("models");
    let files = [
        ("llm/config.json", b"{\"a\": 1}".to_vec(), true),
        (
            "llm/weights/model.safetensors",
            safetensors_like(40 << 20, 9),
            true,
        ),
        ("llm/extra.bin", random_bytes(3 << 20, 5), false),
        ("other/skip.txt", b"not under the prefix".to_vec(), true),
    ];
    for (k, b, sum) in &files {
        g.put("models", k, b, *sum);
    }
    let mut c = Cluster::new_each(1, "", &|_| g.config());
    c.start_all();
    let s0 = &c.nodes[0].scratch;
    let one = s0.out("model.safetensors");
    Run::of(
        g.env(s0.starling())
            .args(["get", "s3://models/llm/weights/model.safetensors", "-O"])
            .arg(&one),
    )
    .ok();
    assert_eq!(sha256_file(&one), sha256_bytes(&files[1].1));
    let dir = s0.out_dir().join("llm");
    let r = Run::of(
        g.env(s0.starling())
            .args(["get", "s3://models/llm/", "-O"])
            .arg(&dir),
    )
    .ok();
    assert!(r.stderr.contains("saved 3 file(s)"), "{}", r.stderr);
    for (k, b, _) in &files[..3] {
        assert_eq!(
            sha256_file(&dir.join(k.strip_prefix("llm/").unwrap())),
            sha256_bytes(b),
            "{k}"
        );
    }
    assert!(!dir.join("skip.txt").exists());
    let tasks: Vec<String> = s0
        .tasks()
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for (k, b, sum) in &files[..3] {
        let by_digest = tasks.contains(&sha256_bytes(b).replace("sha256:", "sha256-"));
        assert_eq!(
            by_digest, *sum,
            "{k}: task by digest only with a checksum: {tasks:?}"
        );
    }
    assert_eq!(tasks.len(), 3, "{tasks:?}");

    // The second node: from its peer.
    let s1 = &c.nodes[1].scratch;
    let dir1 = s1.out_dir().join("llm");
    let r = Run::of(
        g.env(s1.starling())
            .args(["get", "s3://models/llm/", "-O"])
            .arg(&dir1),
    )
    .ok();
    assert!(r.stderr.contains("saved 3 file(s)"), "{}", r.stderr);
    let from_peers = c.nodes[1].metric("starling_bytes_downloaded_total{source=\"parent\"}");
    assert!(from_peers >= (40 << 20) as f64, "{from_peers}");

    // Wrong secret: refused, naming what to check.
    let r = Run::of(
        g.env(s1.starling())
            .env("AWS_SECRET_ACCESS_KEY", "wrong")
            .args(["get", "s3://models/llm/config.json", "-O"])
            .arg(s1.out("x")),
    )
    .fails_with(3);
    assert!(r.stderr.contains("credentials"), "{}", r.stderr);
}

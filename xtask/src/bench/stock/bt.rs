//! The BitTorrent side of `bench stock`: one torrent per piece size (mktorrent), a tracker in
//! the seed's namespace (opentracker, whitelisting that torrent), and three clients driven the
//! same way: aria2c, libtorrent-rasterbar (TCP or uTP) and rqbit. DHT, LSD and PEX are off in
//! every client; peers keep seeding until all are done.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use starling_tests::Lab;

use super::super::procs::Tracked;
use super::{collect, Job, Outcome, Status};

pub const TRACKER_PORT: u16 = 6969;
const PEER_PORT: u16 = 6881;
const RQBIT_API_PORT: u16 = 3030;

pub struct Torrent {
    pub path: PathBuf,
    pub info_hash: [u8; 20],
    pub piece_mib: u64,
}

/// mktorrent over `file` with 2^`piece_log2`-byte pieces, announcing to the seed host's tracker.
pub fn make_torrent(file: &Path, announce: &str, piece_mib: u64, out: &Path) -> Result<Torrent> {
    let _ = std::fs::remove_file(out);
    let log2 = 20 + piece_mib.trailing_zeros();
    let status = Command::new("mktorrent")
        .args(["-l", &log2.to_string(), "-a", announce, "-o"])
        .arg(out)
        .arg(file)
        .stdout(Stdio::null())
        .status()
        .context("cannot run mktorrent (cargo xtask setup installs it)")?;
    if !status.success() {
        bail!("mktorrent failed for {}", file.display());
    }
    let bytes = std::fs::read(out)?;
    Ok(Torrent {
        path: out.to_path_buf(),
        info_hash: info_hash(&bytes)?,
        piece_mib,
    })
}

/// The end of the bencoded value that starts at `i`.
fn skip(b: &[u8], i: usize) -> Result<usize> {
    match b.get(i) {
        Some(b'i') => Ok(i + 1 + b[i..].iter().position(|&c| c == b'e').context("bad int")?),
        Some(b'l' | b'd') => {
            let mut j = i + 1;
            while b.get(j).context("unterminated list")? != &b'e' {
                j = skip(b, j)?;
            }
            Ok(j + 1)
        }
        Some(c) if c.is_ascii_digit() => {
            let colon = i + b[i..]
                .iter()
                .position(|&c| c == b':')
                .context("bad string")?;
            let len: usize = std::str::from_utf8(&b[i..colon])?.parse()?;
            Ok(colon + 1 + len)
        }
        _ => bail!("not bencode at byte {i}"),
    }
}

/// SHA-1 of the torrent's bencoded `info` dictionary.
fn info_hash(torrent: &[u8]) -> Result<[u8; 20]> {
    if torrent.first() != Some(&b'd') {
        bail!("a torrent is a bencoded dictionary");
    }
    let mut j = 1;
    while torrent.get(j).context("truncated torrent")? != &b'e' {
        let value = skip(torrent, j)?;
        let end = skip(torrent, value)?;
        if &torrent[j..value] == b"4:info" {
            let d = ring::digest::digest(
                &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                torrent.get(value..end).context("truncated info")?,
            );
            let mut h = [0u8; 20];
            h.copy_from_slice(d.as_ref());
            return Ok(h);
        }
        j = end;
    }
    bail!("the torrent has no info dictionary")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// opentracker on the seed host, serving only this torrent.
pub struct Tracker {
    pub proc: Tracked,
    addr: String,
}

impl Tracker {
    pub fn start(lab: &Lab, dir: &Path, t: &Torrent) -> Result<Tracker> {
        std::fs::create_dir_all(dir)?;
        // It chroots into `dir` (-d), so the whitelist path is relative to it.
        std::fs::write(dir.join("whitelist"), format!("{}\n", hex(&t.info_hash)))?;
        let addr = lab.hosts[0].addr.clone();
        let port = TRACKER_PORT.to_string();
        let child = lab
            .command(0, "opentracker")
            .args(["-i", &addr, "-p", &port, "-P", &port, "-d"])
            .arg(dir)
            .args(["-w", "whitelist"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start opentracker (cargo xtask setup installs it)")?;
        let tracker = Tracker {
            proc: Tracked::new(child),
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tracker.seeders(t).is_none() {
            if Instant::now() > deadline {
                bail!("opentracker did not answer on {}:{port}", tracker.addr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(tracker)
    }

    /// How many seeders the tracker knows for `t` (a scrape); None when it does not answer.
    pub fn seeders(&self, t: &Torrent) -> Option<u64> {
        let q: String = t.info_hash.iter().map(|b| format!("%{b:02X}")).collect();
        let body = http_get(&self.addr, TRACKER_PORT, &format!("/scrape?info_hash={q}"))?;
        let Some(i) = body.windows(10).position(|w| w == b"8:complete") else {
            // A scrape answer without the torrent: nobody announced it yet.
            return body.starts_with(b"d5:files").then_some(0);
        };
        let rest = body.get(i + 11..)?;
        let end = rest.iter().position(|&c| c == b'e')?;
        std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
    }
}

/// A plain HTTP/1.0 GET's body, or None on any failure (for polling local services).
fn http_get(host: &str, port: u16, path: &str) -> Option<Vec<u8>> {
    let addr = format!("{host}:{port}").parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    if !buf.starts_with(b"HTTP/1.1 200") && !buf.starts_with(b"HTTP/1.0 200") {
        return None;
    }
    Some(buf[head_end + 4..].to_vec())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    Aria2,
    Libtorrent { utp: bool },
    Rqbit,
}

impl Client {
    pub fn name(self) -> &'static str {
        match self {
            Client::Aria2 => "aria2",
            Client::Libtorrent { utp: false } => "libtorrent-tcp",
            Client::Libtorrent { utp: true } => "libtorrent-utp",
            Client::Rqbit => "rqbit",
        }
    }

    /// Host `i`'s client: the seed (`i == 0`, `dir` holds the file) or a leecher writing into
    /// `dir` and, when done, the completion time (epoch seconds) into `done`.
    fn command(self, lab: &Lab, i: usize, t: &Torrent, dir: &Path, done: &Path) -> Command {
        let seed = i == 0;
        let addr = &lab.hosts[i].addr;
        match self {
            Client::Aria2 => {
                let mut c = lab.command(i, "aria2c");
                c.arg("-T").arg(&t.path).arg("-d").arg(dir).args([
                    "--seed-ratio=0.0",
                    "--enable-dht=false",
                    "--enable-dht6=false",
                    "--bt-enable-lpd=false",
                    "--enable-peer-exchange=false",
                    "--disable-ipv6=true",
                    "--file-allocation=none",
                    "--summary-interval=0",
                    "--console-log-level=warn",
                    "--bt-save-metadata=false",
                    "--auto-save-interval=0",
                    &format!("--listen-port={PEER_PORT}"),
                ]);
                if seed {
                    c.arg("--bt-seed-unverified=true");
                } else {
                    // Called when the download completes, before seeding: args GID, file count, path.
                    c.arg(format!(
                        "--on-bt-download-complete={}",
                        done.with_extension("sh").display()
                    ));
                }
                c
            }
            Client::Libtorrent { utp } => {
                let mut c = lab.command(i, "/usr/bin/python3");
                c.arg(crate::root().join("bench/stock/lt_peer.py"))
                    .arg("--torrent")
                    .arg(&t.path)
                    .arg("--save")
                    .arg(dir)
                    .args([
                        "--listen",
                        addr,
                        "--transport",
                        if utp { "utp" } else { "tcp" },
                    ]);
                if seed {
                    c.arg("--seed");
                } else {
                    c.arg("--done").arg(done);
                }
                c
            }
            Client::Rqbit => {
                // rqbit has no switch for PEX; with one tracker that knows every peer it adds
                // nothing.
                let mut c = lab.command(i, "rqbit");
                c.args([
                    "--disable-dht",
                    "--disable-dht-persistence",
                    "--disable-lsd",
                    "--disable-upnp-port-forward",
                    "--ipv4-only",
                    "--listen-port",
                    &PEER_PORT.to_string(),
                    "--http-api-listen-addr",
                    &format!("{addr}:{RQBIT_API_PORT}"),
                    "download",
                    // Without it rqbit refuses to open the seed's existing file.
                    "--overwrite",
                    "-o",
                ])
                .arg(dir)
                .arg(&t.path);
                c
            }
        }
    }

    /// Whether leecher `i` has the whole file: its completion time (epoch seconds) when known.
    fn finished(self, lab: &Lab, i: usize, done: &Path) -> Option<f64> {
        match self {
            Client::Aria2 | Client::Libtorrent { .. } => std::fs::read_to_string(done)
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            Client::Rqbit => {
                let body = http_get(&lab.hosts[i].addr, RQBIT_API_PORT, "/torrents/0/stats/v1")?;
                let v = String::from_utf8_lossy(&body).into_owned();
                v.contains("\"finished\":true").then(now_epoch)
            }
        }
    }
}

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One BitTorrent run: tracker and seed up (the seed announced as complete), then every leecher
/// at once; ends when all are complete or at `job.limit`.
pub fn run(client: Client, job: &Job, t: &Torrent, work: &Path) -> Result<Outcome> {
    let lab = job.lab;
    let _ = std::fs::remove_dir_all(work);
    let seed_dir = work.join("seed");
    std::fs::create_dir_all(&seed_dir)?;
    std::fs::hard_link(job.file, seed_dir.join(job.file_name()))?;
    let tracker = Tracker::start(lab, &work.join("tracker"), t)?;
    let mut procs: Vec<Tracked> = Vec::new();
    let seed_log = std::fs::File::create(work.join("seed.log"))?;
    let seed = client
        .command(lab, 0, t, &seed_dir, &work.join("seed.done"))
        .stdout(seed_log.try_clone()?)
        .stderr(seed_log)
        .spawn()
        .with_context(|| format!("cannot start {}", client.name()))?;
    procs.push(Tracked::new(seed));
    let deadline = Instant::now() + Duration::from_secs(300);
    while tracker.seeders(t).unwrap_or(0) < 1 {
        if procs[0].poll()? {
            bail!(
                "{} seed exited early; see {}",
                client.name(),
                work.join("seed.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!("{} seed never announced itself complete", client.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dirs: Vec<PathBuf> = (1..=job.peers)
        .map(|i| work.join(format!("peer-{i}")))
        .collect();
    let dones: Vec<PathBuf> = (1..=job.peers)
        .map(|i| work.join(format!("peer-{i}.done")))
        .collect();
    for (d, done) in dirs.iter().zip(&dones) {
        std::fs::create_dir_all(d)?;
        let hook = done.with_extension("sh");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\ndate +%s.%N > {p}.tmp && mv {p}.tmp {p}\n",
                p = done.display()
            ),
        )?;
        let mut perm = std::fs::metadata(&hook)?.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&hook, perm)?;
    }
    let sent0 = lab.host_sent_bytes(0);
    let start_epoch = now_epoch();
    let start = Instant::now();
    for i in 1..=job.peers {
        let log = std::fs::File::create(work.join(format!("peer-{i}.log")))?;
        let child = client
            .command(lab, i, t, &dirs[i - 1], &dones[i - 1])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", client.name()))?;
        procs.push(Tracked::new(child));
    }
    let status = collect(job, start, |i| {
        if let Some(at) = client.finished(lab, i + 1, &dones[i]) {
            return Ok(Status::Done((at - start_epoch).max(0.0)));
        }
        if procs[i + 1].poll()? {
            return Ok(Status::Failed(format!(
                "exited early; see {}",
                work.join(format!("peer-{}.log", i + 1)).display()
            )));
        }
        Ok(Status::Running)
    })?;
    let seed_sent = lab.host_sent_bytes(0) - sent0;
    let mut cpu = 0.0;
    let mut rss = Vec::new();
    for (k, p) in procs.iter_mut().enumerate() {
        let u = p.stop()?;
        cpu += u.cpu_secs;
        if k > 0 {
            rss.push(u.max_rss_kib);
        }
    }
    let mut tracker = tracker;
    cpu += tracker.proc.stop()?.cpu_secs;
    let outputs: Vec<PathBuf> = dirs.iter().map(|d| d.join(job.file_name())).collect();
    let out = Outcome::new(
        format!("{}-{}m", client.name(), t.piece_mib),
        status,
        cpu,
        rss,
        seed_sent,
        job,
        &outputs,
    );
    let _ = std::fs::remove_dir_all(work);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_hash_is_the_sha1_of_the_info_dictionary_as_written() {
        let info = b"d6:lengthi5e4:name1:a12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaae";
        let mut t = b"d8:announce9:http://x/13:creation datei1e4:info".to_vec();
        t.extend_from_slice(info);
        t.extend_from_slice(b"e");
        let want = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, info);
        assert_eq!(info_hash(&t).unwrap().as_slice(), want.as_ref());
    }

    #[test]
    fn torrents_without_info_or_truncated_are_refused() {
        assert!(info_hash(b"d8:announce3:abce").is_err());
        assert!(info_hash(b"d4:infod6:lengthi5e").is_err());
        assert!(info_hash(b"l4:infoe").is_err());
        assert!(info_hash(b"d4:info99:abce").is_err());
    }
}

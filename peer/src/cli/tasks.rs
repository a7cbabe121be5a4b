//! `starling tasks`, `starling stat TASK` and `starling rm TASK`: what the running daemon holds,
//! one task in detail, and evicting one. Each asks the daemon (exit code 7 when none answers):
//! it alone knows what it downloads and serves now.

use std::time::{Duration, SystemTime};

use starling::config::Config;
use starling::daemon::api::{ApiEvent, ApiRequest};
use starling::daemon::client_ask;
use starling::fetch::exit;
use starling::swarm::inventory::{TaskDetail, TaskInfo};

use super::Failure;

/// Sends `req`; an error answer becomes a failure with the daemon's exit code.
pub async fn ask(cfg: &Config, req: ApiRequest) -> Result<ApiEvent, Failure> {
    let socket = cfg.socket_path();
    let no_daemon = || {
        Failure(
            exit::NO_DAEMON,
            anyhow::anyhow!(
                "no daemon answers at {}; start `starling daemon` (it owns the store)",
                socket.display()
            ),
        )
    };
    match client_ask(&socket, &req).await {
        Ok(Some(ApiEvent::Error { code, message })) => Err(Failure(code, anyhow::anyhow!(message))),
        Ok(Some(ev)) => Ok(ev),
        Ok(None) => Err(no_daemon()),
        Err(e) => Err(Failure(
            exit::NO_DAEMON,
            anyhow::anyhow!("the daemon at {} did not answer: {e}", socket.display()),
        )),
    }
}

pub fn unexpected(ev: ApiEvent) -> Failure {
    Failure(
        exit::OTHER,
        anyhow::anyhow!("unexpected answer from the daemon: {ev:?}"),
    )
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Failure(exit::OTHER, e.into()))?;
    println!("{text}");
    Ok(())
}

/// `starling tasks`.
pub async fn list(cfg: &Config, json: bool) -> Result<(), Failure> {
    let tasks = match ask(cfg, ApiRequest::Tasks).await? {
        ApiEvent::Tasks(t) => t,
        other => return Err(unexpected(other)),
    };
    if json {
        return print_json(&tasks);
    }
    print!("{}", table(&tasks, SystemTime::now()));
    Ok(())
}

/// `starling stat TASK`.
pub async fn stat(cfg: &Config, task: String, json: bool) -> Result<(), Failure> {
    let d = match ask(cfg, ApiRequest::Stat { task }).await? {
        ApiEvent::Stat(d) => d,
        other => return Err(unexpected(other)),
    };
    if json {
        return print_json(&d);
    }
    print!("{}", detail(&d, SystemTime::now()));
    Ok(())
}

/// `starling rm TASK`.
pub async fn rm(cfg: &Config, task: String) -> Result<(), Failure> {
    match ask(cfg, ApiRequest::Rm { task }).await? {
        ApiEvent::Removed { task, bytes } => {
            println!("removed {task} ({})", size(bytes));
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

fn table(tasks: &[TaskInfo], now: SystemTime) -> String {
    let mut s = format!(
        "{:<14} {:<11} {:>9} {:>13} {:>7} {:>7} {:>9}  {}\n",
        "task", "state", "size", "pieces", "holders", "serving", "last_use", "digest or url"
    );
    for t in tasks {
        s.push_str(&format!(
            "{:<14} {:<11} {:>9} {:>13} {:>7} {:>7} {:>9}  {}\n",
            short(t),
            format!("{:?}", t.state).to_lowercase(),
            size(t.size),
            format!("{}/{}", t.verified, t.pieces),
            t.holders
                .map_or("?".into(), |h| format!("{}+{}", h.complete, h.partial)),
            if t.serving { "yes" } else { "no" },
            ago(t.last_used, now),
            t.digest.as_deref().unwrap_or(&t.url),
        ));
    }
    s.push_str(&format!(
        "{} tasks; holders: complete+partial peers the scheduler knows\n",
        tasks.len()
    ));
    s
}

fn detail(d: &TaskDetail, now: SystemTime) -> String {
    let t = &d.info;
    let mut s = format!(
        "task      {}\ndigest    {}\nurl       {}\nstate     {:?}\nsize      {} ({} bytes), {} pieces of {}\nverified  {} pieces: {}\nholders   {}\nserving   {}\nlast use  {}\ndirectory {}\ncontent   {}\n",
        t.id.dir_name(),
        t.digest.as_deref().unwrap_or("-"),
        t.url,
        t.state,
        size(t.size),
        t.size,
        t.pieces,
        size(t.piece_length),
        t.verified,
        if d.have.is_empty() { "-" } else { &d.have },
        t.holders.map_or("? (the scheduler did not answer)".into(), |h| {
            format!("{} complete, {} partial", h.complete, h.partial)
        }),
        if t.serving { "yes" } else { "no" },
        ago(t.last_used, now),
        d.dir.display(),
        d.content.display(),
    );
    if d.parents.is_empty() {
        s.push_str("parents   none on record (from the origin, an import, or an earlier run)\n");
    } else {
        s.push_str(&format!(
            "parents   {}\n  {:<22} {:>7} {:>10} {:>8} {:>7} {:>6} {:>7}\n",
            if d.from_peers_now {
                "(downloading now)"
            } else {
                "(of the last download)"
            },
            "peer",
            "pieces",
            "MB/s",
            "rtt_ms",
            "loss_%",
            "mtu",
            "strikes"
        ));
        for p in &d.parents {
            s.push_str(&format!(
                "  {:<22} {:>7} {:>10} {:>8.2} {:>7.3} {:>6} {:>7}{}\n",
                p.peer,
                p.pieces,
                p.rate.map_or("-".into(), |r| format!("{:.1}", r / 1e6)),
                p.rtt_ms,
                p.loss * 100.0,
                p.mtu,
                p.strikes,
                if p.blacklisted { " blacklisted" } else { "" }
            ));
        }
    }
    s
}

/// The first 12 hex digits of the ID, with its kind.
fn short(t: &TaskInfo) -> String {
    let name = t.id.dir_name();
    let (kind, hex) = name.split_once('-').unwrap_or(("", &name));
    format!(
        "{}{}",
        if kind == "url" { "u:" } else { "" },
        &hex[..hex.len().min(12)]
    )
}

pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ago(unix: u64, now: SystemTime) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(unix);
    let secs = now.duration_since(at).map_or(0, |d| d.as_secs());
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_as_people_write_them() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(3 << 30), "3.0 GiB");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100_000);
        assert_eq!(ago(100_000 - 30, now), "30s");
        assert_eq!(ago(100_000 - 600, now), "10m");
        assert_eq!(ago(0, now), "27h");
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(500_000);
        assert_eq!(ago(0, later), "5d");
    }
}

//! The command line's shared parts: errors with their exit codes, the progress bar, and the
//! argument parsers clap calls. Each command lives in its own module.

pub mod admin;
pub mod get;
pub mod import;
pub mod init;
pub mod models;
pub mod preheat;
pub mod tasks;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use starling::core::Digest;
use starling::fetch::{exit, FetchError, Progress};

/// An error with the exit code it maps to.
pub struct Failure(pub u8, pub anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(exit::OTHER, e.into())
    }
}

/// Wraps an error with `code`.
pub fn fail(code: u8) -> impl FnOnce(anyhow::Error) -> Failure {
    move |e| Failure(code, e)
}

/// Maps a pipeline error to its exit code.
pub fn classify(e: FetchError) -> Failure {
    Failure(e.exit_code(), e.into())
}

/// `--digest`, parsed (a usage error when malformed).
pub fn parse_digest(arg: Option<&str>) -> Result<Option<Digest>, Failure> {
    arg.map(|d| {
        d.parse::<Digest>()
            .map_err(|e| Failure(exit::USAGE, anyhow::anyhow!("--digest: {e}")))
    })
    .transpose()
}

/// A size with an optional unit: `4194304`, `4M`, `4MiB`, `16K`, `1G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 4194304, 4M or 4MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        _ => return Err(format!("{s:?} has an unknown unit {unit:?}; use K, M or G")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The output file's directory must exist, and the output must not be a directory.
pub fn check_output_dir(out: &Path) -> anyhow::Result<()> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!(
            "-O {}: directory {} does not exist; create it first",
            out.display(),
            dir.display()
        );
    }
    if out.is_dir() {
        anyhow::bail!("-O {}: is a directory; name the output file", out.display());
    }
    Ok(())
}

/// A daemon's progress reports, copied into `progress` (which the bar shows).
pub fn mirror(progress: &Arc<Progress>) -> impl FnMut(u64, u64) {
    let p = progress.clone();
    move |total, done| {
        p.total.store(total, Ordering::Relaxed);
        p.done.store(done, Ordering::Relaxed);
    }
}

/// A progress bar on stderr, drawn from `progress` every 100 ms.
pub struct Bar(Option<(indicatif::ProgressBar, tokio::task::JoinHandle<()>)>);

impl Bar {
    /// A bar when `show` (not quiet, and stderr is a terminal); otherwise nothing is drawn.
    pub fn start(show: bool, p: &Arc<Progress>) -> Bar {
        if !show {
            return Bar(None);
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let (b, p) = (bar.clone(), p.clone());
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                b.set_length(p.total.load(Ordering::Relaxed));
                b.set_position(p.done.load(Ordering::Relaxed));
            }
        });
        Bar(Some((bar, ticker)))
    }

    /// Removes the bar (before a summary line or an error).
    pub fn finish(&mut self) {
        if let Some((bar, ticker)) = self.0.take() {
            ticker.abort();
            bar.finish_and_clear();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("16KiB"), Ok(16 << 10));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
    }
}

//! `starling preheat IMAGE|URL...`: has the running daemon put images and files on the seeds
//! (and a share of the peers) before anyone pulls them, and follows the job to its end.

use std::io::Read;
use std::time::Duration;

use clap::Args;
use starling::config::Config;
use starling::daemon::api::{ApiEvent, ApiRequest};
use starling::fetch::exit;
use starling::swarm::preheat::{Job, JobState, PreheatSpec};

use super::tasks::{ask, size, unexpected};
use super::Failure;

#[derive(Args)]
pub struct PreheatArgs {
    /// Image references (`registry/repo:tag`, `@sha256:...`, or a manifest URL
    /// `https://host/v2/REPO/manifests/REF`) and file URLs.
    #[arg(required = true, value_name = "IMAGE|URL")]
    items: Vec<String>,
    /// Also preheat this share (0 to 1) of the peers that are not seeds.
    #[arg(long, default_value_t = 0.0)]
    share: f64,
    /// The images' platform, os/arch[/variant]. Default: this node's.
    #[arg(long)]
    platform: Option<String>,
    /// Registry user name.
    #[arg(long, requires = "password_stdin")]
    username: Option<String>,
    /// Read the registry password from standard input.
    #[arg(long)]
    password_stdin: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Print the job's ID and return; follow it with `starling preheat --status ID`.
    #[arg(long)]
    detach: bool,
    /// The final job as JSON.
    #[arg(long)]
    json: bool,
}

/// `starling preheat`.
pub async fn run(cfg: &Config, a: PreheatArgs, quiet: bool) -> Result<(), Failure> {
    let (mut images, mut urls) = (Vec::new(), Vec::new());
    for item in a.items {
        let is_url = item.starts_with("http://") || item.starts_with("https://");
        if is_url && !(item.contains("/v2/") && item.contains("/manifests/")) {
            urls.push(item);
        } else {
            images.push(item);
        }
    }
    let password = if a.password_stdin {
        let mut p = String::new();
        std::io::stdin()
            .read_to_string(&mut p)
            .map_err(|e| Failure(exit::USAGE, anyhow::anyhow!("reading the password: {e}")))?;
        Some(p.trim_end_matches(['\n', '\r']).to_string())
    } else {
        None
    };
    let spec = PreheatSpec {
        images,
        urls,
        share: a.share,
        platform: a.platform,
        headers: Default::default(),
        username: a.username,
        password,
        timeout_seconds: Some(a.timeout),
    };
    let id = match ask(cfg, ApiRequest::Preheat(spec)).await? {
        ApiEvent::Preheat { id } => id,
        other => return Err(unexpected(other)),
    };
    if a.detach {
        println!("{id}");
        return Ok(());
    }
    if !quiet && !a.json {
        eprintln!("preheat job {id}");
    }
    let mut last = String::new();
    let job = loop {
        let job = match ask(cfg, ApiRequest::PreheatStatus { id }).await? {
            ApiEvent::Job(j) => *j,
            other => return Err(unexpected(other)),
        };
        let line = progress_line(&job);
        if !quiet && !a.json && line != last {
            eprintln!("{line}");
            last = line;
        }
        if matches!(job.state, JobState::Success | JobState::Failure) {
            break job;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    if a.json {
        let text =
            serde_json::to_string_pretty(&job).map_err(|e| Failure(exit::OTHER, e.into()))?;
        println!("{text}");
    } else if !quiet {
        print!("{}", summary(&job));
    }
    match job.state {
        JobState::Success => Ok(()),
        _ => Err(Failure(
            exit::NETWORK,
            anyhow::anyhow!(
                "preheat job {id} failed: {}",
                job.error.as_deref().unwrap_or("unknown")
            ),
        )),
    }
}

fn progress_line(j: &Job) -> String {
    let targets = j.targets.len() as u32;
    let done = j.tasks.iter().filter(|t| t.complete == targets).count();
    format!(
        "{:?}: {done}/{} tasks on all {targets} targets",
        j.state,
        j.tasks.len()
    )
    .to_lowercase()
}

fn summary(j: &Job) -> String {
    let mut s = format!("targets: {}\n", j.targets.join(", "));
    for t in &j.tasks {
        s.push_str(&format!(
            "{} {:>10} {}/{} targets  {}\n",
            t.task,
            t.size.map_or("-".into(), size),
            t.complete,
            j.targets.len(),
            if t.image.is_empty() { &t.url } else { &t.image }
        ));
    }
    s
}

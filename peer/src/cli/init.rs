//! `starling init containerd|docker`: prints a container runtime's configuration that pulls
//! through this daemon's registry mirror / proxy, or installs it (keeping the old file as .bak).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use starling::config::Config;

#[derive(Subcommand)]
pub enum InitCommand {
    /// containerd `hosts.toml` mirror files (containerd's `config_path`, also `ctr images pull
    /// --hosts-dir`).
    Containerd {
        /// Registry host[:port] to mirror (repeatable); `_default` covers every registry
        /// (containerd 1.7+).
        #[arg(long = "registry", value_name = "HOST", default_value = "docker.io")]
        registries: Vec<String>,
        /// containerd's hosts directory.
        #[arg(long, value_name = "DIR", default_value = "/etc/containerd/certs.d")]
        hosts_dir: PathBuf,
        /// containerd's config file, checked for a `config_path` that reads DIR (a missing
        /// file is skipped with a note).
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/etc/containerd/config.toml"
        )]
        containerd_config: PathBuf,
        /// Exit with code 2 when containerd's config would ignore the files.
        #[arg(long)]
        strict: bool,
        /// Write the files (an existing one is kept as FILE.bak) instead of printing them.
        #[arg(long)]
        write: bool,
    },
    /// Docker: the mirror in daemon.json `registry-mirrors` (Docker Hub images), and with
    /// --proxy a systemd drop-in that sends every registry through the proxy.
    Docker {
        /// Docker's daemon configuration file; other settings in it are kept.
        #[arg(long, value_name = "FILE", default_value = "/etc/docker/daemon.json")]
        daemon_json: PathBuf,
        /// Also route all registries through the HTTP(S) proxy (systemd drop-in).
        #[arg(long)]
        proxy: bool,
        /// Where the drop-in goes.
        #[arg(
            long,
            value_name = "DIR",
            default_value = "/etc/systemd/system/docker.service.d"
        )]
        systemd_dir: PathBuf,
        /// Write the files (an existing one is kept as FILE.bak) instead of printing them.
        #[arg(long)]
        write: bool,
    },
}

/// `starling init`: prints the planned files, or writes them.
pub fn run(cfg: &Config, what: InitCommand) -> anyhow::Result<()> {
    use starling::proxy::init;
    let (files, write, notes) = match what {
        InitCommand::Containerd {
            registries,
            hosts_dir,
            containerd_config,
            strict,
            write,
        } => {
            let files = init::containerd(&cfg.proxy, &registries, &hosts_dir)?;
            match std::fs::read_to_string(&containerd_config) {
                Ok(text) => {
                    let problems = init::check_containerd(&text, &hosts_dir).map_err(|e| {
                        anyhow::anyhow!("{} is not TOML: {e}", containerd_config.display())
                    })?;
                    for p in &problems {
                        eprintln!("warning: {}: {p}", containerd_config.display());
                    }
                    if strict && !problems.is_empty() {
                        anyhow::bail!(
                            "containerd ({}) would not use the mirror; see the warnings above",
                            containerd_config.display()
                        );
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => eprintln!(
                    "note: {} does not exist; make sure containerd's config_path is {:?}",
                    containerd_config.display(),
                    hosts_dir
                ),
                Err(e) => anyhow::bail!("cannot read {}: {e}", containerd_config.display()),
            }
            let note = format!(
                "containerd reads these when its CRI registry config_path is {:?} \
                 ([plugins.\"io.containerd.grpc.v1.cri\".registry] config_path); \
                 ctr takes --hosts-dir {:?}.",
                hosts_dir, hosts_dir
            );
            (files, write, note)
        }
        InitCommand::Docker {
            daemon_json,
            proxy,
            systemd_dir,
            write,
        } => {
            let existing = match std::fs::read_to_string(&daemon_json) {
                Ok(t) => Some(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => anyhow::bail!("cannot read {}: {e}", daemon_json.display()),
            };
            let mut files = vec![init::docker(&cfg.proxy, existing.as_deref(), &daemon_json)?];
            let mut note = "Restart dockerd to apply. Docker uses registry-mirrors for Docker Hub images only.".to_string();
            if proxy {
                files.push(init::docker_proxy(&cfg.proxy, &systemd_dir)?);
                note.push_str(" For intercepted registries, list them in proxy.intercept and install proxy.mitm_ca_cert as /etc/docker/certs.d/<registry>/ca.crt; then systemctl daemon-reload.");
            }
            (files, write, note)
        }
    };
    for f in &files {
        if !write {
            println!("# {}\n{}", f.path.display(), f.contents);
            continue;
        }
        if let Some(dir) = f.path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        match std::fs::read_to_string(&f.path) {
            Ok(old) if old == f.contents => {
                eprintln!("{} is already up to date", f.path.display());
                continue;
            }
            Ok(_) => {
                let bak = f.path.with_extension(format!(
                    "{}.bak",
                    f.path.extension().and_then(|e| e.to_str()).unwrap_or("")
                ));
                std::fs::copy(&f.path, &bak)
                    .with_context(|| format!("cannot back up {}", f.path.display()))?;
                eprintln!(
                    "kept the previous {} as {}",
                    f.path.display(),
                    bak.display()
                );
            }
            Err(_) => {}
        }
        let tmp = f.path.with_extension("starling-tmp");
        std::fs::write(&tmp, &f.contents)
            .and_then(|()| std::fs::rename(&tmp, &f.path))
            .with_context(|| format!("cannot write {}", f.path.display()))?;
        eprintln!("wrote {}", f.path.display());
    }
    eprintln!("{notes}");
    Ok(())
}

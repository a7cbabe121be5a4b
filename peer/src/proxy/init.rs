//! `starling init containerd|docker`: the container runtime configuration that sends pulls
//! through the local daemon's mirror / proxy. Pure functions: they compute file contents; the
//! CLI prints or writes them.

use std::path::{Path, PathBuf};

use crate::config::ProxyConfig;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("the proxy is disabled (proxy.listen is empty); set proxy.listen first")]
    Disabled,
    #[error("{}: {detail}; fix or move the file, then run this again (nothing was changed)", path.display())]
    BadFile { path: PathBuf, detail: String },
    #[error("registry {0:?} is not a host[:port]")]
    Registry(String),
}

/// One file to write.
#[derive(Debug, PartialEq, Eq)]
pub struct Planned {
    pub path: PathBuf,
    pub contents: String,
}

/// The mirror's URL as local clients reach it (`http://127.0.0.1:PORT` for a wildcard listen).
pub fn mirror_url(cfg: &ProxyConfig) -> Result<String, InitError> {
    let addr: std::net::SocketAddr = cfg.listen.parse().map_err(|_| InitError::Disabled)?;
    let host = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
        ip if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    Ok(format!("http://{host}:{}", addr.port()))
}

/// containerd `hosts.toml` files, one per registry, under `hosts_dir` (containerd's
/// `config_path`). `_default` applies to every registry (containerd 1.7 and later).
pub fn containerd(
    cfg: &ProxyConfig,
    registries: &[String],
    hosts_dir: &Path,
) -> Result<Vec<Planned>, InitError> {
    let mirror = mirror_url(cfg)?;
    registries
        .iter()
        .map(|r| {
            if r != "_default" && super::route::check_authority(r).is_err() {
                return Err(InitError::Registry(r.clone()));
            }
            let server = match r.as_str() {
                "_default" => String::new(),
                "docker.io" => "server = \"https://registry-1.docker.io\"\n".to_string(),
                host => format!("server = \"https://{host}\"\n"),
            };
            Ok(Planned {
                path: hosts_dir.join(r).join("hosts.toml"),
                contents: format!(
                    "# Written by `starling init containerd`: pulls go through the local Starling\n\
                     # daemon first, and straight to the registry if it is down.\n\
                     {server}\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                ),
            })
        })
        .collect()
}

/// What in containerd's `config.toml` (`text`) keeps it from reading the `hosts.toml` files
/// in `hosts_dir`; empty when nothing does. Config version 2 (containerd 1.x) keeps
/// `config_path` under `plugins."io.containerd.grpc.v1.cri".registry`, version 3 (2.x) under
/// `plugins."io.containerd.cri.v1.images".registry`. containerd 2.1+ pulls through its
/// transfer service unless `use_local_image_pull = true`, and that path takes `config_path`
/// as one directory, not a `:`-separated list (containerd issues 12415 and 12636; Spegel
/// issue 1272): a list silently disables every mirror.
pub fn check_containerd(text: &str, hosts_dir: &Path) -> Result<Vec<String>, String> {
    let doc: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let version = doc.get("version").and_then(|v| v.as_integer()).unwrap_or(1);
    let plugins = doc.get("plugins").and_then(|p| p.as_table());
    let (section, images) = if version >= 3 {
        (
            "plugins.\"io.containerd.cri.v1.images\".registry",
            plugins.and_then(|p| p.get("io.containerd.cri.v1.images")),
        )
    } else {
        (
            "plugins.\"io.containerd.grpc.v1.cri\".registry",
            plugins.and_then(|p| p.get("io.containerd.grpc.v1.cri")),
        )
    };
    let registry = images
        .and_then(|i| i.get("registry"))
        .and_then(|r| r.as_table());
    let dir = hosts_dir.display().to_string();
    let mut problems = Vec::new();
    let config_path = registry
        .and_then(|r| r.get("config_path"))
        .and_then(|c| c.as_str());
    match config_path {
        None | Some("") => problems.push(format!(
            "containerd reads no hosts.toml: set config_path = {dir:?} under [{section}] and restart containerd"
        )),
        Some(p) if !p.split(':').any(|d| d.trim_end_matches('/') == dir.trim_end_matches('/')) => {
            problems.push(format!(
                "containerd reads hosts.toml from {p:?}, not {dir:?}: write the files there (--hosts-dir {p:?}) or set config_path = {dir:?} under [{section}]"
            ))
        }
        Some(p) if p.contains(':') && version >= 3 => {
            let local = images
                .and_then(|i| i.get("use_local_image_pull"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            if !local {
                problems.push(format!(
                    "config_path = {p:?} is a list: containerd 2.1+ pulls through its transfer service, which takes it as one directory and then uses no mirror; set config_path = {dir:?} alone, or use_local_image_pull = true under [plugins.\"io.containerd.cri.v1.images\"]"
                ));
            }
        }
        Some(_) => {}
    }
    if registry.is_some_and(|r| r.contains_key("mirrors")) {
        problems.push(format!(
            "[{section}.mirrors] is set: containerd uses either mirrors or config_path (2.2 refuses both); move the mirrors to hosts.toml files"
        ));
    }
    Ok(problems)
}

/// Docker's `daemon.json` with the mirror added to `registry-mirrors` (first), every other
/// setting kept. Docker uses mirrors for Docker Hub images only; see [`docker_proxy`] for the
/// rest.
pub fn docker(
    cfg: &ProxyConfig,
    existing: Option<&str>,
    path: &Path,
) -> Result<Planned, InitError> {
    let mirror = mirror_url(cfg)?;
    let bad = |detail: String| InitError::BadFile {
        path: path.to_path_buf(),
        detail,
    };
    let mut doc: serde_json::Value = match existing.map(str::trim) {
        None | Some("") => serde_json::json!({}),
        Some(text) => {
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?
        }
    };
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let mirrors = obj
        .entry("registry-mirrors")
        .or_insert_with(|| serde_json::json!([]));
    let list = mirrors
        .as_array_mut()
        .ok_or_else(|| bad("registry-mirrors is not a list".into()))?;
    list.retain(|m| m.as_str().map(|s| s.trim_end_matches('/')) != Some(mirror.as_str()));
    list.insert(0, serde_json::Value::String(mirror));
    let mut contents = serde_json::to_string_pretty(&doc).map_err(|e| bad(e.to_string()))?;
    contents.push('\n');
    Ok(Planned {
        path: path.to_path_buf(),
        contents,
    })
}

/// A systemd drop-in for docker.service that sends every registry through the proxy (dockerd
/// reads HTTP(S)_PROXY from its environment). Intercepted hosts need `proxy.intercept` and
/// the interception CA in `/etc/docker/certs.d/<registry>/ca.crt`.
pub fn docker_proxy(cfg: &ProxyConfig, dir: &Path) -> Result<Planned, InitError> {
    let mirror = mirror_url(cfg)?;
    Ok(Planned {
        path: dir.join("starling-proxy.conf"),
        contents: format!(
            "# Written by `starling init docker --proxy`.\n[Service]\n\
             Environment=\"HTTP_PROXY={mirror}\" \"HTTPS_PROXY={mirror}\" \"NO_PROXY=localhost,127.0.0.0/8,::1\"\n"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ProxyConfig {
        ProxyConfig {
            listen: "0.0.0.0:65001".into(),
            ..ProxyConfig::default()
        }
    }

    #[test]
    fn containerd_hosts_files() {
        let p = containerd(
            &cfg(),
            &[
                "docker.io".into(),
                "reg.test:5000".into(),
                "_default".into(),
            ],
            Path::new("/etc/containerd/certs.d"),
        )
        .unwrap();
        assert_eq!(
            p[0].path,
            Path::new("/etc/containerd/certs.d/docker.io/hosts.toml")
        );
        assert!(p[0]
            .contents
            .contains("server = \"https://registry-1.docker.io\""));
        assert!(p[1].contents.contains("server = \"https://reg.test:5000\""));
        assert!(p[1].contents.contains("[host.\"http://127.0.0.1:65001\"]"));
        assert!(!p[2].contents.contains("server ="));
        let parsed: toml::Value = toml::from_str(&p[1].contents).unwrap();
        assert_eq!(
            parsed["host"]["http://127.0.0.1:65001"]["capabilities"][0].as_str(),
            Some("pull")
        );
        assert!(containerd(&cfg(), &["../etc".into()], Path::new("/x")).is_err());
        let off = ProxyConfig {
            listen: String::new(),
            ..ProxyConfig::default()
        };
        assert!(matches!(
            containerd(&off, &["a".into()], Path::new("/x")),
            Err(InitError::Disabled)
        ));
    }

    #[test]
    fn docker_json_keeps_other_settings() {
        let path = Path::new("/etc/docker/daemon.json");
        let p = docker(
            &cfg(),
            Some(r#"{"debug": true, "registry-mirrors": ["https://m.example"]}"#),
            path,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&p.contents).unwrap();
        assert_eq!(v["debug"], true);
        assert_eq!(v["registry-mirrors"][0], "http://127.0.0.1:65001");
        assert_eq!(v["registry-mirrors"][1], "https://m.example");
        // Idempotent.
        let again = docker(&cfg(), Some(&p.contents), path).unwrap();
        assert_eq!(again.contents, p.contents);
        assert!(docker(&cfg(), None, path)
            .unwrap()
            .contents
            .contains("registry-mirrors"));
        assert!(matches!(
            docker(&cfg(), Some("{nope"), path),
            Err(InitError::BadFile { .. })
        ));
        assert!(matches!(
            docker(&cfg(), Some("[1]"), path),
            Err(InitError::BadFile { .. })
        ));
    }

    #[test]
    fn docker_proxy_drop_in() {
        let p = docker_proxy(&cfg(), Path::new("/etc/systemd/system/docker.service.d")).unwrap();
        assert!(p.contents.contains("HTTPS_PROXY=http://127.0.0.1:65001"));
    }

    fn problems(text: &str) -> Vec<String> {
        check_containerd(text, Path::new("/etc/containerd/certs.d")).expect("parses")
    }

    #[test]
    fn containerd_configs_that_ignore_the_mirror_are_named() {
        // containerd 1.x (v2) and 2.x (v3) pointing at the hosts directory: fine.
        let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        assert!(problems(v2).is_empty(), "{:?}", problems(v2));
        let v3 = "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = '/etc/containerd/certs.d'\n";
        assert!(problems(v3).is_empty());
        // No config_path, another directory, a list under the transfer service, mirrors.
        assert!(problems("version = 2\n")[0].contains("reads no hosts.toml"));
        let other = v2.replace("/etc/containerd/certs.d", "/etc/docker/certs.d");
        assert!(problems(&other)[0].contains("not \"/etc/containerd/certs.d\""));
        let eks = v3.replace(
            "'/etc/containerd/certs.d'",
            "'/etc/containerd/certs.d:/etc/docker/certs.d'",
        );
        assert!(
            problems(&eks)[0].contains("transfer service"),
            "{:?}",
            problems(&eks)
        );
        let local = eks.replace("[plugins.'io.containerd.cri.v1.images'.registry]", "[plugins.'io.containerd.cri.v1.images']\nuse_local_image_pull = true\n[plugins.'io.containerd.cri.v1.images'.registry]");
        assert!(problems(&local).is_empty(), "{:?}", problems(&local));
        let mirrors = format!("{v2}[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\nendpoint = [\"https://x\"]\n");
        assert!(problems(&mirrors)
            .iter()
            .any(|p| p.contains("mirrors or config_path")));
        assert!(check_containerd("not toml [", Path::new("/x")).is_err());
    }
}

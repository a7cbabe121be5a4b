//! The one configuration file (TOML). Every default lives here, in the `Default` impls, and the
//! README documents each. Unknown keys are rejected so a typo is an error, not a silent default.
//!
//! `${NAME}` (or `${NAME:-default}`) anywhere in the file is replaced by that environment
//! variable before parsing, so one file serves every node of a DaemonSet (`${HOST_IP}`,
//! `${NODE_NAME}` from the downward API). An unset variable without a default is an error
//! naming it; `$${` is a literal `${`.
//!
//! `include = ["other.toml", ...]` merges those files over this one, key by key (tables merge,
//! other values are replaced), in order: the Helm chart's generated file includes the user's.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("config file {path} names ${{{var}}}, which is not set; set it, or write ${{{var}:-default}}")]
    Unset { path: PathBuf, var: String },
    #[error("config value {key} = {value} is invalid: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where tasks are stored. Default: /var/lib/starling as root, else
    /// $XDG_DATA_HOME/starling (or ~/.local/share/starling).
    pub data_dir: PathBuf,
    pub gc: GcConfig,
    pub source: SourceConfig,
    pub storage: StorageConfig,
    pub daemon: DaemonConfig,
    pub peer: PeerConfig,
    pub scheduler: SchedulerSection,
    pub tls: TlsConfig,
    pub proxy: ProxyConfig,
    pub netprobe: NetprobeConfig,
    pub hf: HfConfig,
    pub s3: S3Config,
    pub kubernetes: KubernetesConfig,
    pub tracing: TracingConfig,
}

/// OpenTelemetry tracing over OTLP (see [`crate::telemetry`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector: `http://collector:4318` for OTLP/HTTP (spans go to `/v1/traces`),
    /// `http://collector:4317` for gRPC. Empty (default): no tracing.
    pub otlp_endpoint: String,
    /// `http` (OTLP/HTTP, protobuf) or `grpc`. Default `http`.
    pub protocol: String,
    /// The resource's `service.name`. Default `starling`.
    pub service_name: String,
    /// The share of traces kept, 0 to 1. Default 1.
    pub sample_ratio: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: String::new(),
            protocol: "http".into(),
            service_name: "starling".into(),
            sample_ratio: 1.0,
        }
    }
}

/// Running in Kubernetes: the node's topology labels become `peer.zone` and `peer.rack`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// This pod's node (`${NODE_NAME}` from the downward API). Set: at start the daemon reads
    /// the node's labels through the API (the pod's service account needs `get` on `nodes`)
    /// and fills `peer.zone` and `peer.rack` where they are empty. Default: empty (off).
    pub node_name: String,
    /// The node label naming its zone. Default `topology.kubernetes.io/zone`.
    pub zone_label: String,
    /// The node label naming its rack. Default `topology.kubernetes.io/rack`.
    pub rack_label: String,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            node_name: String::new(),
            zone_label: "topology.kubernetes.io/zone".into(),
            rack_label: "topology.kubernetes.io/rack".into(),
        }
    }
}

/// The Hugging Face Hub: `starling get hf://...`, and the `HF_ENDPOINT` mirror on
/// `proxy.listen` (see [`crate::hub`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HfConfig {
    /// The Hub (or a Hub-compatible server) that `hf://` names and the mirror forwards to.
    /// Default `https://huggingface.co`.
    pub endpoint: String,
    /// A file holding the access token for `hf://` downloads, used when `HF_TOKEN` is unset.
    /// Default: `$HF_HOME/token` (`~/.cache/huggingface/token`) when it exists. The mirror never
    /// uses it: clients send their own.
    pub token_file: Option<PathBuf>,
    /// Serve Hub requests (`HF_ENDPOINT=http://<proxy.listen>`) on the proxy's listener: model
    /// files by SHA-256 peer to peer, everything else passed through. Default true.
    pub mirror: bool,
    /// Files of one `hf://` (or `s3://` prefix) download fetched at once. Default 4.
    pub concurrency: usize,
}

impl Default for HfConfig {
    fn default() -> Self {
        HfConfig {
            endpoint: "https://huggingface.co".into(),
            token_file: None,
            mirror: true,
            concurrency: 4,
        }
    }
}

/// S3 and S3-compatible object stores: `starling get s3://bucket/key` (see [`crate::s3`]).
/// Credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`),
/// else the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, `~/.aws/credentials`,
/// profile `AWS_PROFILE` or `default`); without any, requests are anonymous.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// The service URL, for S3-compatible stores (`http://minio:9000`). Default:
    /// `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`, else `https://s3.<region>.amazonaws.com`.
    pub endpoint: Option<String>,
    /// The signing region. Default: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`
    /// in `~/.aws/config`, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`) instead of virtual-hosted
    /// (`bucket.endpoint/key`). Default: true with a custom endpoint, false for AWS.
    pub path_style: Option<bool>,
    /// Lifetime of the presigned URLs that peers and seeds fetch from, in seconds (at most
    /// 604800, S3's limit). Default 21600 (6 hours).
    pub presign_seconds: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: None,
            path_style: None,
            presign_seconds: 6 * 3600,
        }
    }
}

/// The eBPF path probes (see [`crate::netprobe`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NetprobeConfig {
    /// Load the eBPF probes. Without privileges the daemon logs one line and uses QUIC's own
    /// statistics. Default true.
    pub enabled: bool,
    /// The probe object file. Default: `$STARLING_PROBES`, else `starling-probes.bpf.o` beside
    /// the executable.
    pub object: Option<PathBuf>,
    /// Interfaces to attach to. Default (empty): every interface that is up, loopback aside.
    pub interfaces: Vec<String>,
    /// Adapt transfers to the measured paths: QUIC packet size (PLPMTUD up to the interfaces'
    /// MTU, 8-byte convergence, fast black-hole recovery, starting at the size validated toward
    /// a host), congestion control from measured loss, and TCP MSS clamping across MTU black
    /// holes. `false` keeps quinn's defaults (for comparison). Default true.
    pub adapt: bool,
}

impl Default for NetprobeConfig {
    fn default() -> Self {
        NetprobeConfig {
            enabled: true,
            object: None,
            interfaces: Vec::new(),
            adapt: true,
        }
    }
}

/// The registry mirror and HTTP(S) proxy in front of local container runtimes (see
/// [`crate::proxy`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Where the mirror / proxy listens (`host:port`); empty disables it. Default
    /// `127.0.0.1:65001`.
    pub listen: String,
    /// Regexes on the request path: a GET that matches one goes peer to peer, everything else
    /// passes through unchanged. Default: `/v2/.+/blobs/sha256:[0-9a-f]{64}$` (OCI blobs).
    pub rules: Vec<String>,
    /// The upstream registry (`https://host[:port]`) for mirror requests that name none (no
    /// `ns=` query parameter and no `upstream_header`), such as Docker's `registry-mirrors`.
    /// Default `https://registry-1.docker.io`.
    pub default_upstream: String,
    /// A request header that names the upstream registry for a mirror request. Default
    /// `X-Starling-Upstream`.
    pub upstream_header: String,
    /// Registries (`host[:port]`) reached over plain HTTP instead of HTTPS in mirror mode.
    /// Default none.
    pub insecure_registries: Vec<String>,
    /// Regexes on `host:port` of CONNECT requests that are intercepted (TLS terminated with a
    /// leaf certificate from `mitm_ca_cert`, so their blob GETs can go peer to peer). Every other
    /// CONNECT is tunnelled untouched. Default none.
    pub intercept: Vec<String>,
    /// PEM certificate of the CA that signs intercepted hosts' leaf certificates (clients must
    /// trust it). Required with `intercept`.
    pub mitm_ca_cert: Option<PathBuf>,
    /// PEM private key of that CA.
    pub mitm_ca_key: Option<PathBuf>,
    /// Largest request head (request line and headers) accepted, in bytes; larger gets 431.
    /// Default 65536.
    pub max_header_bytes: usize,
    /// Client connections held at once; more wait in the kernel's backlog, so a flood here
    /// cannot take every file descriptor from the peer and the local API. Default 1024.
    pub max_connections: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "127.0.0.1:65001".into(),
            rules: vec![r"/v2/.+/blobs/sha256:[0-9a-f]{64}$".into()],
            default_upstream: "https://registry-1.docker.io".into(),
            upstream_header: "X-Starling-Upstream".into(),
            insecure_registries: Vec::new(),
            intercept: Vec::new(),
            mitm_ca_cert: None,
            mitm_ca_key: None,
            max_header_bytes: 65536,
            max_connections: 1024,
        }
    }
}

/// The daemon as a peer: where it serves pieces over QUIC and how it downloads from others.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PeerConfig {
    /// QUIC (UDP) address peers connect to. Default `0.0.0.0:7950`.
    pub listen: String,
    /// `host:port` other peers dial. Default: the listen port on the local address that routes
    /// to the first scheduler (127.0.0.1 with the embedded scheduler).
    pub advertise: String,
    /// A seed peer is the one that goes back to source first. Default false.
    pub seed: bool,
    /// Upload capacity announced to the scheduler, in Mbit/s (0: unknown). Default 0.
    pub upload_mbps: f64,
    /// Upload rate limit for piece data, in Mbit/s (0: unlimited). Default 0.
    pub upload_limit_mbps: f64,
    /// Parents downloaded from at once. Default 8.
    pub max_parents: usize,
    /// Whether a peer may go back to source for pieces no parent has (after
    /// `source_wait_ms`) or when parents are too slow. Default true.
    pub source_fallback: bool,
    /// How long a download with nothing to fetch from parents waits before fetching the
    /// pieces nobody has from source, in milliseconds. Default 3000.
    pub source_wait_ms: u64,
    /// Parents together slower than this (Mbit/s) for `source_wait_ms` send the rest to source
    /// (0: never). Default 0.
    pub source_min_mbps: f64,
    /// A piece request unanswered this long (or 4x its expected time) is a strike. Default
    /// 10000.
    pub piece_timeout_ms: u64,
    /// Milliseconds between announcements to the scheduler. Default 500. A round with nothing
    /// new (no piece, task, origin read or upload) goes every 2 s only, or this if longer.
    pub announce_interval_ms: u64,
    /// A finished task not uploaded for this long stops being served (and announced), so GC
    /// may evict it; a starting daemon serves again the stored complete tasks used within this
    /// long. Default 3600.
    pub serve_idle_seconds: u64,
    /// This node's zone label (e.g. a cloud availability zone). The scheduler prefers parents
    /// in the requester's zone. Default empty (unknown).
    pub zone: String,
    /// This node's rack label. The scheduler prefers parents in the requester's rack, so the
    /// spine carries each piece into a rack about once. Default empty (unknown).
    pub rack: String,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            listen: "0.0.0.0:7950".into(),
            advertise: String::new(),
            seed: false,
            upload_mbps: 0.0,
            upload_limit_mbps: 0.0,
            max_parents: 8,
            source_fallback: true,
            source_wait_ms: 3000,
            source_min_mbps: 0.0,
            piece_timeout_ms: 10_000,
            announce_interval_ms: 500,
            serve_idle_seconds: 3600,
            zone: String::new(),
            rack: String::new(),
        }
    }
}

/// Where the schedulers are (`starling daemon`) and how one behaves (`starling scheduler`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {
    /// Schedulers (`ip:port`, or `name:port`: every address the name resolves to is one
    /// scheduler, so a Kubernetes headless Service names all replicas); tasks are split among
    /// them by consistent hashing of the task ID. Empty (default): the daemon embeds its own
    /// scheduler, which answers on its QUIC port.
    pub addrs: Vec<String>,
    /// How often names in `addrs` are resolved again (replicas come and go). Default 30.
    pub resolve_interval_seconds: u64,
    /// Where `starling scheduler` listens (QUIC). Default `0.0.0.0:7960`.
    pub listen: String,
    /// Where `starling scheduler` serves `/healthz` and `/metrics` (HTTP); empty: nowhere.
    /// Default `127.0.0.1:9465`.
    pub metrics_addr: String,
    /// A peer not heard from for this long is forgotten. Default 30.
    pub peer_ttl_seconds: u64,
    /// Children a parent is expected to feed at once before its rank falls. Default 4.
    pub fanout: f64,
    /// Tasks this scheduler lets peers read from origins at once (one fetcher each; the
    /// others wait their turn). With several schedulers, the cluster's limit is the sum.
    /// 0 (default): no limit.
    pub max_fetchers: usize,
    /// Origin bandwidth in Mbit/s that this scheduler's fetchers share (each is told its
    /// share, and paces its reads). 0 (default): no limit.
    pub max_source_mbps: f64,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        SchedulerSection {
            addrs: Vec::new(),
            resolve_interval_seconds: 30,
            listen: "0.0.0.0:7960".into(),
            metrics_addr: "127.0.0.1:9465".into(),
            peer_ttl_seconds: 30,
            fanout: 4.0,
            max_fetchers: 0,
            max_source_mbps: 0.0,
        }
    }
}

/// The cluster CA. Unset (default): a CA is generated in `<data_dir>/tls/` on first start,
/// which is enough for peers sharing one data directory's CA (one host). For a cluster, give
/// every node the same CA certificate and key files; each node issues its own certificate.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the cluster CA certificate.
    pub ca_cert: Option<PathBuf>,
    /// PEM file of the cluster CA private key.
    pub ca_key: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// The local API's unix socket (mode 0600: only the daemon's user may use it). Default:
    /// `<data_dir>/starling.sock`.
    pub socket: Option<PathBuf>,
    /// Seconds between garbage-collection passes. Default 300.
    pub gc_interval_seconds: u64,
    /// Where Prometheus scrapes `/metrics` (`host:port`); empty disables it.
    /// Default `127.0.0.1:9464`.
    pub metrics_addr: String,
    /// Threads that run the networking (QUIC, HTTP, the API) of every command. 1 runs it all on
    /// one thread, with no wakeups between threads: the cheapest where the daemon shares a few
    /// cores with the workload. Disk I/O, hashing of whole contents and GC have their own
    /// threads either way. 0 (default): one per 4 cores, at least 1. At most
    /// [`MAX_RUNTIME_THREADS`].
    pub runtime_threads: usize,
    /// Local API connections held at once (a connection that sends no request within 10 s is
    /// closed). Default 256.
    pub max_api_connections: usize,
    /// The bearer token the HTTP preheat API (`/api/v1/preheat`, `/oapi/v1/jobs` on
    /// `daemon.metrics_addr`) requires. Empty (default): only clients on this host are served.
    pub api_token: String,
}

/// The most `daemon.runtime_threads` may ask for.
pub const MAX_RUNTIME_THREADS: usize = 256;

impl DaemonConfig {
    /// [`DaemonConfig::runtime_threads`], with 0 resolved for `cores` available cores.
    pub fn threads(&self, cores: usize) -> usize {
        match self.runtime_threads {
            0 => (cores / 4).max(1),
            n => n,
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: None,
            gc_interval_seconds: 300,
            metrics_addr: "127.0.0.1:9464".into(),
            runtime_threads: 0,
            max_api_connections: 256,
            api_token: String::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GcConfig {
    /// A task not used for this long is evicted. Default 86400 (one day).
    pub ttl_seconds: u64,
    /// Bytes the store may use. 0 (default) means: watermarks apply to the whole file system
    /// that holds `data_dir`.
    pub capacity_bytes: u64,
    /// Start evicting, least recently used first, above this fraction of capacity. Default 0.85.
    pub high_watermark: f64,
    /// Stop evicting below this fraction. Default 0.75.
    pub low_watermark: f64,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    /// Parallel Range requests per task. Default 4.
    pub concurrency: usize,
    /// Requests to origins this node has open at once, over every task (later ones wait their
    /// turn); 0: no limit. Default 0.
    pub max_connections: usize,
    /// Bytes per second this node reads from origins, in Mbit/s, over every task; 0: no limit.
    /// Default 0.
    pub max_mbps: f64,
    /// Attempts per piece before the download fails. Default 6.
    pub attempts: u32,
    /// First retry delay in milliseconds, doubled each time up to 5 s, with jitter. Default 200.
    pub backoff_ms: u64,
    /// TCP + TLS connect timeout in seconds. Default 10.
    pub connect_timeout_seconds: u64,
    /// A response that sends nothing for this long is retried. Default 30.
    pub idle_timeout_seconds: u64,
    /// Extra CA certificates (PEM files) trusted for HTTPS origins, beside the system roots.
    pub ca_certs: Vec<PathBuf>,
    /// Query parameters left out of a URL's task ID (signatures and expiry of pre-signed URLs).
    pub filtered_query_params: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Verified pieces are journaled in groups at this interval in milliseconds: the most
    /// download progress a crash can lose. The journal is not synced with the content (a
    /// resume re-hashes every journaled piece), so no transfer waits for an fdatasync; a
    /// flush, and closing an unfinished task, do sync. Default 5000.
    pub commit_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: default_data_dir(),
            gc: GcConfig::default(),
            source: SourceConfig::default(),
            storage: StorageConfig::default(),
            daemon: DaemonConfig::default(),
            peer: PeerConfig::default(),
            scheduler: SchedulerSection::default(),
            tls: TlsConfig::default(),
            proxy: ProxyConfig::default(),
            netprobe: NetprobeConfig::default(),
            hf: HfConfig::default(),
            s3: S3Config::default(),
            kubernetes: KubernetesConfig::default(),
            tracing: TracingConfig::default(),
        }
    }
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            ttl_seconds: 86_400,
            capacity_bytes: 0,
            high_watermark: 0.85,
            low_watermark: 0.75,
        }
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            concurrency: 4,
            max_connections: 0,
            max_mbps: 0.0,
            attempts: 6,
            backoff_ms: 200,
            connect_timeout_seconds: 10,
            idle_timeout_seconds: 30,
            ca_certs: Vec::new(),
            filtered_query_params: [
                "X-Amz-Algorithm",
                "X-Amz-Credential",
                "X-Amz-Date",
                "X-Amz-Expires",
                "X-Amz-SignedHeaders",
                "X-Amz-Signature",
                "X-Amz-Security-Token",
                "Expires",
                "Signature",
                "AWSAccessKeyId",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            commit_interval_ms: 5000,
        }
    }
}

fn default_data_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/starling");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("starling");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/starling")
}

/// The config file read when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/starling/starling.toml";

/// One file's table, its `${VAR}`s filled in.
fn read_table(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    let text = expand_env(text, |v| std::env::var(v).ok()).map_err(|var| ConfigError::Unset {
        path: path.to_path_buf(),
        var,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

/// `over`'s keys over `base`'s: tables merge key by key, anything else is replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Replaces `${NAME}` and `${NAME:-default}` with `lookup(NAME)` (or the default); `$${` is a
/// literal `${`. Err: the first variable that is unset and has no default.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(r) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = r;
        } else if let Some(r) = after.strip_prefix("${") {
            let Some(end) = r.find('}') else {
                out.push_str(after);
                return Ok(out);
            };
            let (name, default) = match r[..end].split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (&r[..end], None),
            };
            match lookup(name)
                .filter(|v| !v.is_empty())
                .or(default.map(str::to_string))
            {
                Some(v) => out.push_str(&v),
                None => return Err(name.to_string()),
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

impl Config {
    /// Loads `path`, or the default path if it exists, or the built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default())
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        Config::parse(&path, &text, |f| std::fs::read_to_string(f))
    }

    /// Parses `text`, the configuration file at `path` (named in errors; `include`s are
    /// relative to it and read with `read`), and validates it. Nothing else is touched.
    pub fn parse(
        path: &Path,
        text: &str,
        read: impl Fn(&Path) -> std::io::Result<String>,
    ) -> Result<Config, ConfigError> {
        let path = path.to_path_buf();
        let mut table = read_table(&path, text)?;
        // `include = [FILE, ...]`: each file's keys are merged over this one's, in order.
        if let Some(inc) = table.remove("include") {
            let files: Vec<PathBuf> = inc.try_into().map_err(|_| ConfigError::Invalid {
                key: "include",
                value: path.display().to_string(),
                why: "must be a list of file paths",
            })?;
            for f in files {
                let f = match f.is_absolute() {
                    true => f,
                    false => path.parent().unwrap_or(Path::new("/")).join(f),
                };
                let text = read(&f).map_err(|source| ConfigError::Read {
                    path: f.clone(),
                    source,
                })?;
                merge(&mut table, read_table(&f, &text)?);
            }
        }
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e| ConfigError::Parse {
                path: path.clone(),
                source: Box::new(e),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `data_dir` may be created, but only its last component: a configured directory whose
    /// parent is missing is a typo more often than a wish (the built-in default may be made
    /// whole).
    pub fn check_data_dir(&self) -> Result<(), ConfigError> {
        if !self.data_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                key: "data_dir",
                value: self.data_dir.display().to_string(),
                why: "must be an absolute path",
            });
        }
        if self.data_dir == default_data_dir() || self.data_dir.exists() {
            return Ok(());
        }
        match self.data_dir.parent() {
            Some(p) if !p.is_dir() => Err(ConfigError::Invalid {
                key: "data_dir",
                value: self.data_dir.display().to_string(),
                why: "its parent directory does not exist; create it first (Starling creates only the last component)",
            }),
            _ => Ok(()),
        }
    }

    /// The local API socket: `daemon.socket`, else `<data_dir>/starling.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.daemon
            .socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("starling.sock"))
    }

    fn validate_models(&self) -> Result<(), ConfigError> {
        let bad = |key, value: String, why| Err(ConfigError::Invalid { key, value, why });
        let http_url = |u: &str| {
            url::Url::parse(u)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        };
        if !http_url(&self.hf.endpoint) {
            return bad(
                "hf.endpoint",
                self.hf.endpoint.clone(),
                "must be an http(s) URL such as https://huggingface.co",
            );
        }
        if !(1..=64).contains(&self.hf.concurrency) {
            return bad(
                "hf.concurrency",
                self.hf.concurrency.to_string(),
                "must be 1 to 64",
            );
        }
        if let Some(e) = self.s3.endpoint.as_deref().filter(|e| !http_url(e)) {
            return bad(
                "s3.endpoint",
                e.to_string(),
                "must be an http(s) URL such as http://127.0.0.1:3900",
            );
        }
        if !(60..=604_800).contains(&self.s3.presign_seconds) {
            return bad(
                "s3.presign_seconds",
                self.s3.presign_seconds.to_string(),
                "must be 60 to 604800 (S3 refuses presigned URLs valid for longer than 7 days)",
            );
        }
        Ok(())
    }

    fn validate_proxy(&self) -> Result<(), ConfigError> {
        let bad = |key, value: String, why| Err(ConfigError::Invalid { key, value, why });
        let p = &self.proxy;
        if !p.listen.is_empty() && p.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "proxy.listen",
                p.listen.clone(),
                "must be ip:port, e.g. 127.0.0.1:65001, or empty to disable the proxy",
            );
        }
        for r in p.rules.iter().chain(&p.intercept) {
            if regex::Regex::new(r).is_err() {
                return bad(
                    "proxy.rules / proxy.intercept",
                    r.clone(),
                    "is not a valid regular expression",
                );
            }
        }
        match url::Url::parse(&p.default_upstream) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
            _ => {
                return bad(
                    "proxy.default_upstream",
                    p.default_upstream.clone(),
                    "must be an http(s) URL such as https://registry-1.docker.io",
                )
            }
        }
        if http::HeaderName::from_bytes(p.upstream_header.as_bytes()).is_err() {
            return bad(
                "proxy.upstream_header",
                p.upstream_header.clone(),
                "must be a valid HTTP header name",
            );
        }
        if p.mitm_ca_cert.is_some() != p.mitm_ca_key.is_some()
            || (!p.intercept.is_empty() && p.mitm_ca_cert.is_none())
        {
            return bad(
                "proxy.mitm_ca_cert / proxy.mitm_ca_key",
                "missing".into(),
                "set both to a CA's PEM certificate and key; proxy.intercept needs them",
            );
        }
        if !(8192..=1 << 20).contains(&p.max_header_bytes) {
            return bad(
                "proxy.max_header_bytes",
                p.max_header_bytes.to_string(),
                "must be 8192 to 1048576",
            );
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, value: String, why| Err(ConfigError::Invalid { key, value, why });
        let g = &self.gc;
        if !(g.high_watermark > 0.0 && g.high_watermark <= 1.0) {
            return bad(
                "gc.high_watermark",
                g.high_watermark.to_string(),
                "must be in (0, 1]",
            );
        }
        if !(g.low_watermark >= 0.0 && g.low_watermark < g.high_watermark) {
            return bad(
                "gc.low_watermark",
                g.low_watermark.to_string(),
                "must be at least 0 and below gc.high_watermark",
            );
        }
        self.validate_models()?;
        if self.daemon.runtime_threads > MAX_RUNTIME_THREADS {
            return bad(
                "daemon.runtime_threads",
                self.daemon.runtime_threads.to_string(),
                "must be 0 (one per 4 cores) to 256",
            );
        }
        if self.proxy.max_connections == 0 || self.daemon.max_api_connections == 0 {
            return bad(
                "proxy.max_connections / daemon.max_api_connections",
                "0".into(),
                "must be at least 1",
            );
        }
        if !self.data_dir.is_absolute() {
            return bad(
                "data_dir",
                self.data_dir.display().to_string(),
                "must be an absolute path (a relative one would depend on where each command runs)",
            );
        }
        let s = &self.source;
        if !(1..=64).contains(&s.concurrency) {
            return bad(
                "source.concurrency",
                s.concurrency.to_string(),
                "must be 1 to 64",
            );
        }
        if s.attempts == 0 {
            return bad("source.attempts", "0".into(), "must be at least 1");
        }
        if s.idle_timeout_seconds == 0 || s.connect_timeout_seconds == 0 {
            return bad(
                "source.*_timeout_seconds",
                "0".into(),
                "timeouts must be at least 1",
            );
        }
        if !self.daemon.metrics_addr.is_empty()
            && self
                .daemon
                .metrics_addr
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return bad(
                "daemon.metrics_addr",
                self.daemon.metrics_addr.clone(),
                "must be host:port, e.g. 127.0.0.1:9464, or empty",
            );
        }
        if self.daemon.gc_interval_seconds == 0 {
            return bad(
                "daemon.gc_interval_seconds",
                "0".into(),
                "must be at least 1",
            );
        }
        let addr = |key, v: &str| -> Result<(), ConfigError> {
            match v.parse::<std::net::SocketAddr>() {
                Ok(_) => Ok(()),
                Err(_) => bad(key, v.to_string(), "must be ip:port, e.g. 0.0.0.0:7950"),
            }
        };
        addr("peer.listen", &self.peer.listen)?;
        if !self.peer.advertise.is_empty() {
            addr("peer.advertise", &self.peer.advertise)?;
        }
        addr("scheduler.listen", &self.scheduler.listen)?;
        for a in &self.scheduler.addrs {
            let name_port = a.rsplit_once(':').is_some_and(|(host, port)| {
                port.parse::<u16>().is_ok()
                    && !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            });
            if a.parse::<std::net::SocketAddr>().is_err() && !name_port {
                return bad(
                    "scheduler.addrs",
                    a.clone(),
                    "must be ip:port or name:port, e.g. 10.0.0.1:7960 or starling-scheduler:7960",
                );
            }
        }
        let t = &self.tracing;
        if !matches!(t.protocol.as_str(), "http" | "grpc") {
            return bad(
                "tracing.protocol",
                t.protocol.clone(),
                "must be http or grpc",
            );
        }
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return bad(
                "tracing.sample_ratio",
                t.sample_ratio.to_string(),
                "must be between 0 and 1",
            );
        }
        let e = &t.otlp_endpoint;
        if !(e.is_empty() || e.starts_with("http://") || e.starts_with("https://")) {
            return bad(
                "tracing.otlp_endpoint",
                t.otlp_endpoint.clone(),
                "must be an http(s) URL, e.g. http://otel-collector:4318",
            );
        }
        let p = &self.peer;
        if !(1..=64).contains(&p.max_parents) {
            return bad(
                "peer.max_parents",
                p.max_parents.to_string(),
                "must be 1 to 64",
            );
        }
        if !(p.upload_mbps >= 0.0 && p.source_min_mbps >= 0.0 && p.upload_limit_mbps >= 0.0) {
            return bad("peer.*_mbps", "negative".into(), "rates must be 0 or more");
        }
        if p.piece_timeout_ms < 100 || p.announce_interval_ms < 10 {
            return bad(
                "peer.piece_timeout_ms / peer.announce_interval_ms",
                format!("{} / {}", p.piece_timeout_ms, p.announce_interval_ms),
                "must be at least 100 / 10",
            );
        }
        if self.scheduler.peer_ttl_seconds == 0 || self.scheduler.fanout < 1.0 {
            return bad(
                "scheduler.peer_ttl_seconds / scheduler.fanout",
                format!(
                    "{} / {}",
                    self.scheduler.peer_ttl_seconds, self.scheduler.fanout
                ),
                "must be at least 1",
            );
        }
        if self.tls.ca_cert.is_some() != self.tls.ca_key.is_some() {
            return bad(
                "tls.ca_cert / tls.ca_key",
                "only one set".into(),
                "set both (the cluster CA's certificate and key) or neither",
            );
        }
        self.validate_proxy()?;
        if self.storage.commit_interval_ms == 0 || self.storage.commit_interval_ms > 60_000 {
            return bad(
                "storage.commit_interval_ms",
                self.storage.commit_interval_ms.to_string(),
                "must be 1 to 60000",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_threads_default_to_one_per_four_cores() {
        let d = DaemonConfig::default();
        assert_eq!(
            (d.threads(1), d.threads(2), d.threads(8), d.threads(64)),
            (1, 1, 2, 16)
        );
        let d = DaemonConfig {
            runtime_threads: 3,
            ..d
        };
        assert_eq!(d.threads(64), 3);
    }

    #[test]
    fn defaults_are_valid_and_partial_files_merge() {
        Config::default().validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "data_dir = \"/x\"\n[gc]\nttl_seconds = 5\n").unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/x"));
        assert_eq!(c.gc.ttl_seconds, 5);
        assert_eq!(c.gc.high_watermark, GcConfig::default().high_watermark);
    }

    #[test]
    fn typos_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[gc]\nttl_secs = 5\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("ttl_secs") && e.contains("c.toml"), "{e}");
        std::fs::write(&p, "[gc]\nlow_watermark = 0.9\nhigh_watermark = 0.8\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("gc.low_watermark"), "{e}");
        let e = Config::load(Some(&dir.path().join("missing.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }

    /// Every key the configuration has, as `section.key`, from the defaults with the optional
    /// keys set (TOML leaves out unset ones).
    fn every_key() -> Vec<String> {
        let mut c = Config::default();
        c.tls.ca_cert = Some("a".into());
        c.tls.ca_key = Some("b".into());
        c.proxy.mitm_ca_cert = Some("c".into());
        c.proxy.mitm_ca_key = Some("d".into());
        c.netprobe.object = Some("e".into());
        c.daemon.socket = Some("f".into());
        c.hf.token_file = Some("g".into());
        c.s3.endpoint = Some("http://h".into());
        c.s3.region = Some("i".into());
        c.s3.path_style = Some(true);
        let v: toml::Value = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        let mut keys = Vec::new();
        for (k, v) in v.as_table().unwrap() {
            match v.as_table() {
                Some(t) => keys.extend(t.keys().map(|n| format!("{k}.{n}"))),
                None => keys.push(k.clone()),
            }
        }
        keys
    }

    #[test]
    fn the_configuration_reference_documents_every_key_and_no_other() {
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
        )
        .unwrap();
        let keys = every_key();
        assert!(keys.len() > 40, "{keys:?}");
        for k in &keys {
            assert!(
                doc.contains(&format!("`{k}`")),
                "docs/configuration.md does not document {k}"
            );
        }
        // Every key the reference's table names is one the configuration has.
        for line in doc.lines().filter(|l| l.starts_with("| `")) {
            let cell = line.split('|').nth(1).unwrap_or_default();
            for name in cell.split('`').skip(1).step_by(2) {
                assert!(
                    keys.iter().any(|k| k == name),
                    "docs/configuration.md names {name}, which is not a key"
                );
            }
        }
    }

    #[test]
    fn environment_variables_fill_in_the_file() {
        let env = |v: &str| match v {
            "HOST_IP" => Some("10.0.0.7".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        assert_eq!(
            expand_env("advertise = \"${HOST_IP}:7000\"", env).unwrap(),
            "advertise = \"10.0.0.7:7000\""
        );
        assert_eq!(
            expand_env("zone = \"${ZONE:-}\"", env).unwrap(),
            "zone = \"\""
        );
        assert_eq!(expand_env("r = \"${EMPTY:-a}\"", env).unwrap(), "r = \"a\"");
        assert_eq!(
            expand_env("p = \"$5 $${X}\"", env).unwrap(),
            "p = \"$5 ${X}\""
        );
        assert_eq!(expand_env("x = \"${NOPE}\"", env).unwrap_err(), "NOPE");
        assert_eq!(expand_env("x = \"${open", env).unwrap(), "x = \"${open");
    }

    #[test]
    fn included_files_merge_over_the_main_one_key_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("main.toml");
        std::fs::write(
            &main,
            "include = [\"extra.toml\"]\n[peer]\nlisten = \"0.0.0.0:7950\"\nseed = true\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("extra.toml"),
            "[peer]\nseed = false\n[source]\nconcurrency = 9\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&main)).unwrap();
        assert_eq!(cfg.peer.listen, "0.0.0.0:7950");
        assert!(!cfg.peer.seed);
        assert_eq!(cfg.source.concurrency, 9);
        std::fs::write(dir.path().join("extra.toml"), "[peer]\nsed = 1\n").unwrap();
        let e = Config::load(Some(&main)).unwrap_err().to_string();
        assert!(e.contains("sed"), "{e}");
        std::fs::remove_file(dir.path().join("extra.toml")).unwrap();
        let e = Config::load(Some(&main)).unwrap_err().to_string();
        assert!(e.contains("extra.toml"), "{e}");
    }
}

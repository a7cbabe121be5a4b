//! `starling daemon`: one long-lived process that owns the store and does downloads for local
//! clients through its API (see [`api`]). Duplicate requests for one task are served once (the
//! task's lease serialises them; the second is a store hit). GC runs periodically.
//!
//! The daemon is also a peer (see [`crate::swarm`]): it serves what it holds over QUIC,
//! announces it to the scheduler (its own embedded one unless `scheduler.addrs` is set), and
//! downloads from other peers.

pub mod api;
mod http;
mod preheat_api;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::Config;
use crate::context::NodeContext;
use crate::fetch::{exit, FetchError, Fetcher, Progress, Served};
use crate::swarm::Swarm;
use api::{ApiEvent, ApiRequest, GetRequest, ImportRequest};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("another daemon is already listening on {}; stop it first", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("cannot listen on {}: {source}", path.display())]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source}; set daemon.metrics_addr to a free address, or to \"\" to disable it")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error("cannot start the peer (check peer.listen and the [tls] files)")]
    Swarm(#[from] crate::swarm::SwarmError),
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let socket = cfg.socket_path();
    let gc_every = Duration::from_secs(cfg.daemon.gc_interval_seconds);
    let metrics_addr = cfg.daemon.metrics_addr.clone();
    let ctx = NodeContext::open(cfg).map_err(FetchError::from)?;
    let fetcher = Arc::new(Fetcher::new(ctx.clone()));
    if UnixStream::connect(&socket).await.is_ok() {
        return Err(DaemonError::AlreadyRunning(socket));
    }
    // The socket opens last: a client that reaches it finds the peer and the proxy up.
    let swarm = Swarm::start(ctx.clone(), fetcher).await?;
    let proxy = crate::proxy::Proxy::start(swarm.clone()).await?;
    let listener = bind(&socket).await?;
    let metrics = if metrics_addr.is_empty() {
        None
    } else {
        let l = tokio::net::TcpListener::bind(&metrics_addr)
            .await
            .map_err(|source| DaemonError::Metrics {
                addr: metrics_addr.clone(),
                source,
            })?;
        tracing::info!(addr = %metrics_addr, "serving /metrics and the status page");
        Some(tokio::spawn(http::serve(l, swarm.clone())))
    };
    tracing::info!(socket = %socket.display(), "daemon listening");
    let gc = {
        let (ctx, s) = (ctx.clone(), swarm.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(gc_every);
            loop {
                tick.tick().await;
                s.expire_served();
                // Over budget with what is left: stop serving complete tasks no peer asked for
                // lately (they hold a lease while served), and collect again.
                if ctx.collect_garbage_async().await && s.shed_served() > 0 {
                    ctx.collect_garbage_async().await;
                }
            }
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| DaemonError::Listen {
            path: socket.clone(),
            source,
        })?;
    let mut guard = crate::accept::Guard::new(
        "api",
        crate::accept::within_fd_limit(ctx.cfg.daemon.max_api_connections, 0.25),
        ctx.metrics.clone(),
    );
    loop {
        tokio::select! {
            conn = accept_api(&listener, &mut guard) => {
                if let Some((stream, slot)) = conn {
                    let s = swarm.clone();
                    tokio::spawn(async move {
                        serve(s, stream).await;
                        drop(slot);
                    });
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    gc.abort();
    if let Some(p) = proxy {
        p.abort();
    }
    if let Some(m) = metrics {
        m.abort();
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("daemon stopped");
    Ok(())
}

/// The next API connection and its slot; None after a failed accept (already waited out).
async fn accept_api(
    listener: &UnixListener,
    guard: &mut crate::accept::Guard,
) -> Option<(UnixStream, tokio::sync::OwnedSemaphorePermit)> {
    let slot = guard.slot().await?;
    match listener.accept().await {
        Ok((stream, _)) => {
            guard.accepted();
            Some((stream, slot))
        }
        Err(e) => {
            drop(slot);
            guard.failed(&e).await;
            None
        }
    }
}

async fn bind(socket: &Path) -> Result<UnixListener, DaemonError> {
    let listen_err = |source| DaemonError::Listen {
        path: socket.to_path_buf(),
        source,
    };
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            return Err(DaemonError::AlreadyRunning(socket.to_path_buf()));
        }
        // A stale socket from a daemon that died: nobody answers on it.
        std::fs::remove_file(socket).map_err(listen_err)?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(socket).map_err(listen_err)?;
    // The daemon writes output files for its clients: only its own user may ask.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    Ok(listener)
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, ev: &ApiEvent) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(ev).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// A client has this long to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve(swarm: Arc<Swarm>, stream: UnixStream) {
    let ctx = swarm.context().clone();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let line = match tokio::time::timeout(REQUEST_TIMEOUT, api::read_line(&mut r)).await {
        Ok(line) => line,
        Err(_) => return,
    };
    let ev = match line {
        Ok(Some(line)) => match api::parse_request(&line) {
            Ok(ApiRequest::Probe) => ApiEvent::Probe(swarm.probe_report()),
            Ok(ApiRequest::Tasks) => match swarm.tasks(usize::MAX).await {
                Ok(t) => ApiEvent::Tasks(t),
                Err(e) => inventory_error(e),
            },
            Ok(ApiRequest::Stat { task }) => match swarm.stat(&task).await {
                Ok(d) => ApiEvent::Stat(Box::new(d)),
                Err(e) => inventory_error(e),
            },
            Ok(ApiRequest::Preheat(spec)) => match swarm.preheat(spec) {
                Ok(id) => ApiEvent::Preheat { id },
                Err(e) => usage(e.to_string()),
            },
            Ok(ApiRequest::PreheatStatus { id }) => match swarm.preheat_job(id) {
                Some(job) => ApiEvent::Job(Box::new(job)),
                None => usage(format!("no preheat job {id} on this daemon")),
            },
            Ok(ApiRequest::Rm { task }) => match swarm.remove(&task).await {
                Ok(bytes) => ApiEvent::Removed { task, bytes },
                Err(e) => inventory_error(e),
            },
            Ok(ApiRequest::Get(req)) => {
                ctx.collect_garbage_async().await;
                handle_get(&swarm, req, &mut w).await
            }
            Ok(ApiRequest::Import(req)) => {
                ctx.collect_garbage_async().await;
                handle_import(&swarm, req, &mut w).await
            }
            Err(e) => ApiEvent::Error {
                code: exit::USAGE,
                message: format!("bad API request: {e}"),
            },
        },
        Ok(None) => return,
        Err(e) => ApiEvent::Error {
            code: exit::USAGE,
            message: format!("bad API request: {e}"),
        },
    };
    let _ = send(&mut w, &ev).await;
}

fn inventory_error(e: crate::swarm::inventory::InventoryError) -> ApiEvent {
    ApiEvent::Error {
        code: e.exit_code(),
        message: e.to_string(),
    }
}

fn usage(message: String) -> ApiEvent {
    ApiEvent::Error {
        code: exit::USAGE,
        message,
    }
}

async fn handle_get(
    swarm: &Arc<Swarm>,
    req: GetRequest,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> ApiEvent {
    if !req.output.is_absolute() || req.output.parent().is_none_or(|d| !d.is_dir()) {
        return usage(format!(
            "-O {}: needs an absolute path in an existing directory",
            req.output.display()
        ));
    }
    let progress = Arc::new(Progress::default());
    let res = with_progress(swarm.pull(&req.request, &progress), &progress, w).await;
    let fetched = match res {
        Ok(f) => f,
        Err(e) => {
            return ApiEvent::Error {
                code: e.exit_code(),
                message: e.to_string(),
            }
        }
    };
    // A copy (no hard link across file systems) may take seconds: off the network thread.
    let (out, link) = (req.output.clone(), !req.no_hardlink);
    let (fetched, placed) = match tokio::task::spawn_blocking(move || {
        let placed = fetched.deliver(&out, link);
        (fetched, placed)
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            return ApiEvent::Error {
                code: exit::LOCAL,
                message: format!("cannot write {}: {e}", req.output.display()),
            }
        }
    };
    match placed {
        Ok(placed) => ApiEvent::Done {
            bytes: fetched.manifest.plan().content_length(),
            digest: fetched.manifest.content_digest().to_string(),
            from_store: fetched.served == Served::Store,
            origin_bytes: progress.origin_bytes.load(Ordering::Relaxed),
            parent_bytes: progress.parent_bytes.load(Ordering::Relaxed),
            placed: placed.to_string(),
        },
        Err(e) => ApiEvent::Error {
            code: exit::LOCAL,
            message: format!("cannot write {}: {e}", req.output.display()),
        },
    }
}

/// Runs `work`, sending the client a progress line every 200 ms.
async fn with_progress<T>(
    work: impl std::future::Future<Output = T>,
    progress: &Progress,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> T {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tick.tick() => {
                let ev = ApiEvent::Progress {
                    total: progress.total.load(Ordering::Relaxed),
                    done: progress.done.load(Ordering::Relaxed),
                };
                // A client that went away gets no output, but the work finishes for the store.
                let _ = send(w, &ev).await;
            }
        }
    }
}

async fn handle_import(
    swarm: &Arc<Swarm>,
    req: ImportRequest,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> ApiEvent {
    if !req.path.is_absolute() {
        return usage(format!("{}: needs an absolute path", req.path.display()));
    }
    let import = req;
    let progress = Arc::new(Progress::default());
    match with_progress(swarm.import(&import, &progress), &progress, w).await {
        Ok(f) => ApiEvent::Done {
            bytes: f.manifest.plan().content_length(),
            digest: f.manifest.content_digest().to_string(),
            from_store: f.served == Served::Store,
            origin_bytes: 0,
            parent_bytes: 0,
            placed: if import.link { "hard link" } else { "copy" }.to_string(),
        },
        Err(e) => ApiEvent::Error {
            code: e.exit_code(),
            message: e.to_string(),
        },
    }
}

/// Asks the daemon on `socket` to import a file. `Ok(None)`: no daemon answers there.
pub async fn client_import(
    socket: &Path,
    req: &ImportRequest,
    on_progress: impl FnMut(u64, u64),
) -> std::io::Result<Option<ApiEvent>> {
    client_call(socket, &ApiRequest::Import(req.clone()), on_progress).await
}

/// Connects to the daemon's socket; `Ok(None)` when no daemon answers there.
async fn connect_api(socket: &Path) -> std::io::Result<Option<UnixStream>> {
    match UnixStream::connect(socket).await {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Asks the daemon on `socket` for its path report. `None`: no daemon answers there.
pub async fn client_probe(socket: &Path) -> std::io::Result<Option<crate::netprobe::ProbeReport>> {
    match client_ask(socket, &ApiRequest::Probe).await? {
        None => Ok(None),
        Some(ApiEvent::Probe(report)) => Ok(Some(report)),
        Some(ApiEvent::Error { message, .. }) => Err(std::io::Error::other(message)),
        Some(other) => Err(std::io::Error::other(format!(
            "unexpected answer {other:?}"
        ))),
    }
}

/// Sends one request that has no progress lines; `Ok(None)` when no daemon answers there.
pub async fn client_ask(socket: &Path, req: &ApiRequest) -> std::io::Result<Option<ApiEvent>> {
    client_call(socket, req, |_, _| {}).await
}

/// Sends a get to the daemon at `socket`. `Ok(None)` when no daemon answers there (the caller
/// then works in-process). `on_progress(total, done)` is called as the daemon reports.
pub async fn client_get(
    socket: &Path,
    req: &GetRequest,
    on_progress: impl FnMut(u64, u64),
) -> std::io::Result<Option<ApiEvent>> {
    client_call(socket, &ApiRequest::Get(req.clone()), on_progress).await
}

/// Sends one request; progress lines go to `on_progress`, the final answer is returned.
async fn client_call(
    socket: &Path,
    req: &ApiRequest,
    mut on_progress: impl FnMut(u64, u64),
) -> std::io::Result<Option<ApiEvent>> {
    let Some(stream) = connect_api(socket).await? else {
        return Ok(None);
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut r = BufReader::new(r);
    while let Some(line) = api::read_line(&mut r).await? {
        match serde_json::from_str::<ApiEvent>(&line).map_err(std::io::Error::other)? {
            ApiEvent::Progress { total, done } => on_progress(total, done),
            last => return Ok(Some(last)),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the daemon closed the connection before answering",
    ))
}

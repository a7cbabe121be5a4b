//! A small HTTP/1.1 origin that misbehaves on purpose: 5xx, connection resets mid-body, bodies
//! shorter than their Content-Length, slow trickles, ignored or mis-answered Range requests,
//! and required credentials. It counts the requests it answered and the body bytes it sent.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to do wrong. Counters ("next N responses") count down as responses are sent.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Answer the next N requests with 500.
    pub status_500: u32,
    /// For the next N responses, reset the connection (RST) after this many body bytes.
    pub reset_after: Option<(u32, u64)>,
    /// For the next N responses, announce the full length but send only this many bytes, then
    /// close cleanly.
    pub short_body: Option<(u32, u64)>,
    /// Answer every request 200 with the whole body, as if Range did not exist.
    pub ignore_range: bool,
    /// Answer the probe (bytes=0-0) properly, then ignore Range for the rest.
    pub ignore_range_after_probe: bool,
    /// Answer ranged requests with a Content-Range one byte off what was asked.
    pub wrong_content_range: bool,
    /// Answer ranged requests with correct headers but the bytes from offset 0 (a lie that
    /// only a digest can catch).
    pub wrong_range_bytes: bool,
    /// Body bytes per second per response (a slow trickle).
    pub rate: Option<u64>,
    /// Require exactly this Authorization header, else 401.
    pub require_auth: Option<String>,
    /// Answer 403 to everything.
    pub forbidden: bool,
}

pub struct FaultOrigin {
    pub port: u16,
    faults: Arc<Mutex<Faults>>,
    content: Arc<Mutex<Arc<Vec<u8>>>>,
    served: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    active: Arc<AtomicU64>,
    /// The most requests served at once (each response closes its connection).
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// Counts a response as active until it is dropped.
struct Active(Arc<AtomicU64>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FaultOrigin {
    pub fn start(content: Vec<u8>) -> FaultOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fault origin");
        let port = listener.local_addr().expect("local addr").port();
        let o = FaultOrigin {
            port,
            faults: Arc::default(),
            content: Arc::new(Mutex::new(Arc::new(content))),
            served: Arc::default(),
            requests: Arc::default(),
            active: Arc::default(),
            peak: Arc::default(),
            stop: Arc::default(),
        };
        let (faults, content, served, requests, active, peak, stop) = (
            o.faults.clone(),
            o.content.clone(),
            o.served.clone(),
            o.requests.clone(),
            o.active.clone(),
            o.peak.clone(),
            o.stop.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (faults, content, served, requests) = (
                    faults.clone(),
                    content.clone(),
                    served.clone(),
                    requests.clone(),
                );
                let now = active.fetch_add(1, Ordering::Relaxed) + 1;
                peak.fetch_max(now, Ordering::Relaxed);
                let guard = Active(active.clone());
                std::thread::spawn(move || {
                    serve(conn, &faults, &content, &served, &requests);
                    drop(guard);
                });
            }
        });
        o
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    pub fn set(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.faults.lock().expect("faults lock"));
    }

    /// Replaces the content (the origin's file "changes").
    pub fn replace_content(&self, content: Vec<u8>) {
        *self.content.lock().expect("content lock") = Arc::new(content);
    }

    pub fn bytes_served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Connections still being served (a killed client's may linger until writes fail).
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// The most requests it served at once.
    pub fn peak_active(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for FaultOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn read_head(conn: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() > 16 * 1024 || conn.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    String::from_utf8(buf).ok()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `bytes=S-E` (or `S-`) against a length; None when unsatisfiable or malformed.
pub(crate) fn parse_range(v: &str, len: u64) -> Option<(u64, u64)> {
    let (s, e) = v.strip_prefix("bytes=")?.split_once('-')?;
    let s: u64 = s.parse().ok()?;
    let e: u64 = if e.is_empty() {
        len.checked_sub(1)?
    } else {
        e.parse::<u64>().ok()?.min(len.checked_sub(1)?)
    };
    (s <= e).then_some((s, e))
}

fn take(counter: &mut Option<(u32, u64)>) -> Option<u64> {
    match counter {
        Some((n, at)) if *n > 0 => {
            *n -= 1;
            Some(*at)
        }
        _ => None,
    }
}

fn reset(conn: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn serve(
    mut conn: TcpStream,
    faults: &Mutex<Faults>,
    content: &Mutex<Arc<Vec<u8>>>,
    served: &AtomicU64,
    requests: &AtomicU64,
) {
    let Some(head) = read_head(&mut conn) else {
        return;
    };
    requests.fetch_add(1, Ordering::Relaxed);
    let data = content.lock().map(|c| c.clone()).unwrap_or_default();
    let len = data.len() as u64;
    let range = header(&head, "range").and_then(|r| parse_range(r, len));
    let is_probe = range == Some((0, 0));
    let (status, reset_at, short_at, f) = {
        let mut f = faults.lock().expect("faults lock");
        let status = if f.forbidden {
            403
        } else if f
            .require_auth
            .as_deref()
            .is_some_and(|want| header(&head, "authorization") != Some(want))
        {
            401
        } else if f.status_500 > 0 {
            f.status_500 -= 1;
            500
        } else {
            200
        };
        let (r, s) = if status == 200 {
            (take(&mut f.reset_after), take(&mut f.short_body))
        } else {
            (None, None)
        };
        (status, r, s, f.clone())
    };
    if status != 200 {
        let msg =
            format!("HTTP/1.1 {status} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let _ = conn.write_all(msg.as_bytes());
        return;
    }
    let honour = range.is_some() && !f.ignore_range && (is_probe || !f.ignore_range_after_probe);
    let etag = "\"fault-origin-v1\"";
    let (mut head_out, body_start, body_len) = match range {
        Some((s, e)) if honour => {
            let shown = if f.wrong_content_range {
                (s + 1, e + 1)
            } else {
                (s, e)
            };
            let start = if f.wrong_range_bytes { 0 } else { s };
            (
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {}-{}/{len}\r\nContent-Length: {}\r\n",
                    shown.0,
                    shown.1,
                    e - s + 1
                ),
                start,
                e - s + 1,
            )
        }
        _ => (
            format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n"),
            0,
            len,
        ),
    };
    head_out.push_str(&format!(
        "ETag: {etag}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n"
    ));
    if conn.write_all(head_out.as_bytes()).is_err() || head.starts_with("HEAD ") {
        return;
    }
    let limit = [reset_at, short_at]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(body_len)
        .min(body_len);
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < limit {
        let n = (limit - sent).min(16 * 1024);
        let from = (body_start + sent) as usize;
        let chunk = &data[from..from + n as usize];
        if conn.write_all(chunk).is_err() {
            return;
        }
        sent += n;
        served.fetch_add(n, Ordering::Relaxed);
        // No pause after the last chunk: the response is over for the client.
        if sent >= limit {
            break;
        }
        if let Some(rate) = f.rate {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    if reset_at.is_some_and(|r| r < body_len) {
        reset(&conn);
    }
}

//! Where a proxied request goes, decided without I/O ([`decide`]): refused, tunnelled or
//! intercepted (CONNECT), to the Hub mirror, peer to peer, or passed through; which upstream it
//! is for, and whether its path is a well-formed registry path. The fuzz target `proxy_route`
//! drives [`decide`] with request heads parsed from arbitrary bytes.

use std::sync::OnceLock;

use regex::Regex;

use crate::config::ProxyConfig;
use crate::core::Digest;

/// Why the proxy itself refuses a request (a 400 with an OCI error body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(
        "repository name {0:?} is invalid: use lowercase path components such as library/alpine"
    )]
    Name(String),
    #[error("digest {0:?} is invalid: expected sha256: and 64 lowercase hex digits")]
    Digest(String),
    #[error("upstream registry {0:?} is invalid: expected host[:port]")]
    Upstream(String),
}

impl RouteError {
    /// The OCI distribution error code.
    pub fn code(&self) -> &'static str {
        match self {
            RouteError::Name(_) => "NAME_INVALID",
            RouteError::Digest(_) => "DIGEST_INVALID",
            RouteError::Upstream(_) => "UNSUPPORTED",
        }
    }
}

/// Where one request goes (see [`decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Answered by the proxy itself: `status` with an OCI error body.
    Reject {
        status: u16,
        code: &'static str,
        message: String,
    },
    /// A CONNECT to `authority` (`host:port`, checked): intercepted (TLS terminated here) or
    /// tunnelled untouched.
    Connect { authority: String, intercept: bool },
    /// An origin-form request outside `/v2/` for the Hugging Face mirror.
    Hub,
    /// A GET matching `proxy.rules`: served peer to peer as the content of `url`.
    Blob { url: String, digest: Option<Digest> },
    /// Forwarded to `url` unchanged.
    Pass { url: String },
}

/// What the proxy knows when a request arrives: its configuration and compiled rules, whether
/// the Hub mirror is on, and whether interception is configured (a CA to sign with).
pub struct Routing<'a> {
    pub cfg: &'a ProxyConfig,
    pub rules: &'a Rules,
    pub hub_mirror: bool,
    pub can_intercept: bool,
}

/// Decides where `req` goes. `intercepted` is the `host:port` of the intercepted CONNECT the
/// request arrived inside, if any.
pub fn decide<B>(r: &Routing<'_>, req: &http::Request<B>, intercepted: Option<&str>) -> Route {
    let reject = |status: u16, code, message: String| Route::Reject {
        status,
        code,
        message,
    };
    let refuse = |e: RouteError| reject(400, e.code(), e.to_string());
    let head = head_len(req);
    if head > r.cfg.max_header_bytes {
        return reject(
            431,
            "UNSUPPORTED",
            format!(
                "request head is {head} bytes, over proxy.max_header_bytes ({})",
                r.cfg.max_header_bytes
            ),
        );
    }
    let uri = req.uri();
    if req.method() == http::Method::CONNECT {
        let Some(authority) = uri.authority().map(|a| a.to_string()) else {
            return reject(
                400,
                "UNSUPPORTED",
                "CONNECT needs a host:port target".into(),
            );
        };
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok_and(|n| n > 0));
        if check_authority(&authority).is_err() || !has_port {
            return reject(
                400,
                "UNSUPPORTED",
                format!("CONNECT target {authority:?} is not host:port"),
            );
        }
        let intercept = r.can_intercept && r.rules.intercept(&authority);
        return Route::Connect {
            authority,
            intercept,
        };
    }
    let path = uri.path();
    let query = uri.query();
    if !path.starts_with('/') {
        // `OPTIONS *` (asterisk-form) names no resource to fetch. (Found by fuzzing: inside an
        // intercepted CONNECT it became the URL `https://host:443*`.)
        return reject(
            400,
            "UNSUPPORTED",
            format!("request target {path:?} is not a path"),
        );
    }
    let (base, query) = if let Some(authority) = intercepted {
        (format!("https://{authority}"), query.map(String::from))
    } else if let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) {
        if !matches!(scheme, "http" | "https") {
            return reject(
                400,
                "UNSUPPORTED",
                format!("scheme {scheme:?} is not proxied; use http"),
            );
        }
        if let Err(e) = check_authority(authority.as_str()) {
            return refuse(e);
        }
        (format!("{scheme}://{authority}"), query.map(String::from))
    } else if r.hub_mirror && path != "/v2" && !path.starts_with("/v2/") {
        return Route::Hub;
    } else {
        let named = req
            .headers()
            .get(r.cfg.upstream_header.as_str())
            .and_then(|v| v.to_str().ok());
        match mirror_upstream(r.cfg, query, named) {
            Ok(x) => x,
            Err(e) => return refuse(e),
        }
    };
    let digest = match check_path(path) {
        Ok(d) => d,
        Err(e) => return refuse(e),
    };
    let url = match &query {
        Some(q) => format!("{base}{path}?{q}"),
        None => format!("{base}{path}"),
    };
    if req.method() == http::Method::GET && r.rules.p2p(path) {
        Route::Blob { url, digest }
    } else {
        Route::Pass { url }
    }
}

/// The size of a request head as sent: the request line, each header as `name: value` with its
/// line end, and the blank line. Optional whitespace around a value is not kept by the parser,
/// so this is the smallest head that carries these fields; hyper's read buffer (one byte over the
/// limit) catches the rest, however the head arrives.
pub fn head_len<B>(req: &http::Request<B>) -> usize {
    let line = req.method().as_str().len() + 1 + req.uri().to_string().len() + 1 + 8 + 2;
    let fields: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    line + fields + 2
}

fn name_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // The distribution spec's repository name grammar: lowercase components joined by '/';
    // separators only between alphanumerics, so "..", "." and "%2e" never pass.
    RE.get_or_init(|| {
        Regex::new(
            r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$",
        )
        .expect("static regex")
    })
}

fn digest_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$").expect("static regex")
    })
}

/// A registry API path, checked: `/v2/<name>/(blobs|manifests|tags|referrers)/...`.
/// Returns the blob digest for `/v2/<name>/blobs/sha256:<hex>`.
pub fn check_path(path: &str) -> Result<Option<Digest>, RouteError> {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Ok(None);
    };
    const KINDS: [&str; 4] = ["/blobs/", "/manifests/", "/tags/", "/referrers/"];
    let Some((at, kind)) = KINDS
        .iter()
        .filter_map(|k| rest.rfind(k).map(|i| (i, *k)))
        .max_by_key(|(i, _)| *i)
    else {
        // /v2/ itself, /v2/_catalog: no repository name in it.
        if rest.contains("..") || rest.contains('%') {
            return Err(RouteError::Name(rest.to_string()));
        }
        return Ok(None);
    };
    let name = &rest[..at];
    if name.len() > 255 || !name_re().is_match(name) {
        return Err(RouteError::Name(name.to_string()));
    }
    let tail = &rest[at + kind.len()..];
    if kind != "/blobs/" || tail.starts_with("uploads") {
        return Ok(None);
    }
    if !digest_re().is_match(tail) {
        return Err(RouteError::Digest(tail.to_string()));
    }
    if tail.starts_with("sha256:") {
        return tail
            .parse::<Digest>()
            .map(Some)
            .map_err(|_| RouteError::Digest(tail.to_string()));
    }
    // Another algorithm: well-formed, passed through.
    Ok(None)
}

/// The upstream (`scheme://host[:port]`) of a mirror request, and its query with `ns` removed.
///
/// containerd names the registry in `ns=`; other clients may name it in the configured header;
/// Docker's `registry-mirrors` names none, so the default upstream applies.
pub fn mirror_upstream(
    cfg: &ProxyConfig,
    query: Option<&str>,
    header: Option<&str>,
) -> Result<(String, Option<String>), RouteError> {
    let mut ns = None;
    let mut rest = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("ns=") {
            // containerd percent-encodes it ("host%3A5000").
            Some(_) => {
                ns = url::form_urlencoded::parse(pair.as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
            }
            None => rest.push(pair),
        }
    }
    let rest = (!rest.is_empty()).then(|| rest.join("&"));
    if let Some(host) = ns {
        return Ok((registry_base(cfg, &host)?, rest));
    }
    if let Some(h) = header.map(str::trim).filter(|h| !h.is_empty()) {
        let base = if let Some(u) = h.strip_prefix("https://").or(h.strip_prefix("http://")) {
            let scheme = if h.starts_with("https") {
                "https"
            } else {
                "http"
            };
            check_authority(u.trim_end_matches('/'))?;
            format!("{scheme}://{}", u.trim_end_matches('/'))
        } else {
            registry_base(cfg, h)?
        };
        return Ok((base, rest));
    }
    Ok((cfg.default_upstream.trim_end_matches('/').to_string(), rest))
}

/// `https://host` for a registry host (`http://` for the configured insecure ones); Docker Hub's
/// name `docker.io` is its API host `registry-1.docker.io`.
fn registry_base(cfg: &ProxyConfig, host: &str) -> Result<String, RouteError> {
    check_authority(host)?;
    let host = if host == "docker.io" || host == "index.docker.io" {
        "registry-1.docker.io"
    } else {
        host
    };
    let scheme = if cfg.insecure_registries.iter().any(|h| h == host) {
        "http"
    } else {
        "https"
    };
    Ok(format!("{scheme}://{host}"))
}

/// `host[:port]` with nothing else in it (no path, user info or query that could redirect the
/// upstream request elsewhere).
pub fn check_authority(a: &str) -> Result<(), RouteError> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
            .expect("static regex")
    });
    if a.len() <= 261 && re.is_match(a) && whatwg_same_host(a) {
        Ok(())
    } else {
        Err(RouteError::Upstream(a.to_string()))
    }
}

/// Whether the URL parser the upstream request goes through (WHATWG's, in `url`) reads the
/// host as written: a last label of digits or `0x` makes it parse the host as IPv4, so
/// `registry.example.0` fails and `0x7f.1` becomes 127.0.0.1. Such names are refused here
/// rather than failing (or going elsewhere) upstream. (Found by fuzzing.)
fn whatwg_same_host(a: &str) -> bool {
    let host = match a.rsplit_once(':') {
        Some((h, port))
            if !port.is_empty()
                && port.bytes().all(|c| c.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']')) =>
        {
            h
        }
        _ => a,
    };
    match url::Url::parse(&format!("http://{a}/")) {
        Ok(u) => u.host_str().is_some_and(|h| h.eq_ignore_ascii_case(host)),
        Err(_) => false,
    }
}

/// Compiled `proxy.rules` and `proxy.intercept`.
pub struct Rules {
    p2p: Vec<Regex>,
    intercept: Vec<Regex>,
}

impl Rules {
    /// Compiles the rules (validated with the config, so this cannot fail on a loaded config).
    pub fn new(cfg: &ProxyConfig) -> Result<Rules, regex::Error> {
        let compile = |v: &[String]| {
            v.iter()
                .map(|r| Regex::new(r))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Rules {
            p2p: compile(&cfg.rules)?,
            intercept: compile(&cfg.intercept)?,
        })
    }

    /// Whether a GET of `path` goes peer to peer.
    pub fn p2p(&self, path: &str) -> bool {
        self.p2p.iter().any(|r| r.is_match(path))
    }

    /// Whether a CONNECT to `authority` (host:port) is intercepted.
    pub fn intercept(&self, authority: &str) -> bool {
        self.intercept.iter().any(|r| r.is_match(authority))
    }
}

/// A parsed single `Range: bytes=` header against a content of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Range {
    /// Serve the whole content (no Range, or one this proxy does not narrow: several ranges,
    /// another unit, or malformed, all of which a server may ignore).
    Full,
    /// Serve `start..=end`.
    Part { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

pub fn parse_range(header: Option<&str>, len: u64) -> Range {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Range::Full;
    };
    if spec.contains(',') {
        return Range::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Range::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        (true, false) => match num(b) {
            // Suffix: the last n bytes.
            Some(0) => Range::Unsatisfiable,
            Some(n) if len > 0 => Range::Part {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            Some(_) => Range::Unsatisfiable,
            None => Range::Full,
        },
        (false, _) => {
            let Some(start) = num(a) else {
                return Range::Full;
            };
            let end = if b.is_empty() { Some(u64::MAX) } else { num(b) };
            match end {
                None => Range::Full,
                Some(end) if end < start => Range::Full,
                Some(_) if start >= len => Range::Unsatisfiable,
                Some(end) => Range::Part {
                    start,
                    end: end.min(len - 1),
                },
            }
        }
        (true, true) => Range::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_are_what_the_url_parser_reads() {
        for good in [
            "registry.example",
            "Registry.Example:443",
            "localhost:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "[fe80::1]",
            "a-b.c9:1",
        ] {
            assert!(check_authority(good).is_ok(), "{good}");
        }
        for bad in [
            "registry.example.0",
            "registri.examplex.0",
            "0x7f.1",
            "1.2.3.999",
            "017.0.0.1",
            "host/path",
            "user@host",
            "host:port",
            "",
        ] {
            assert!(check_authority(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decide_routes_each_way_in() {
        let cfg = ProxyConfig {
            intercept: vec!["^hub\\.example:443$".into()],
            ..ProxyConfig::default()
        };
        let rules = Rules::new(&cfg).unwrap();
        let r = Routing {
            cfg: &cfg,
            rules: &rules,
            hub_mirror: true,
            can_intercept: true,
        };
        let req = |m: &str, u: &str| http::Request::builder().method(m).uri(u).body(()).unwrap();
        let blob = format!("/v2/library/alpine/blobs/sha256:{HEX}");
        assert_eq!(
            decide(&r, &req("GET", &format!("{blob}?ns=docker.io")), None),
            Route::Blob {
                url: format!("https://registry-1.docker.io{blob}"),
                digest: Some(format!("sha256:{HEX}").parse().unwrap()),
            }
        );
        assert!(matches!(
            decide(&r, &req("HEAD", &format!("{blob}?ns=docker.io")), None),
            Route::Pass { .. }
        ));
        assert_eq!(
            decide(&r, &req("CONNECT", "hub.example:443"), None),
            Route::Connect {
                authority: "hub.example:443".into(),
                intercept: true
            }
        );
        assert!(matches!(
            decide(&r, &req("CONNECT", "other.example:443"), None),
            Route::Connect {
                intercept: false,
                ..
            }
        ));
        assert!(matches!(
            decide(&r, &req("CONNECT", "other.example:0"), None),
            Route::Reject { status: 400, .. }
        ));
        assert_eq!(
            decide(&r, &req("GET", "/org/repo/resolve/main/f"), None),
            Route::Hub
        );
        assert_eq!(
            decide(
                &r,
                &req("GET", "/v2/a/manifests/x"),
                Some("hub.example:443")
            ),
            Route::Pass {
                url: "https://hub.example:443/v2/a/manifests/x".into()
            }
        );
        assert!(matches!(
            decide(&r, &req("OPTIONS", "*"), Some("hub.example:443")),
            Route::Reject { status: 400, .. }
        ));
        assert!(matches!(
            decide(&r, &req("GET", "ftp://h/v2/"), None),
            Route::Reject { status: 400, .. }
        ));
        assert!(matches!(
            decide(&r, &req("GET", "/v2/a/blobs/x?ns=evil.com/x"), None),
            Route::Reject {
                status: 400,
                code: "UNSUPPORTED",
                ..
            }
        ));
    }

    #[test]
    fn head_len_counts_the_head_as_sent() {
        let raw = "GET /v2/a/manifests/x?ns=b HTTP/1.1\r\nHost: x\r\nX-Pad: abc\r\n\r\n";
        let req = http::Request::get("/v2/a/manifests/x?ns=b")
            .header("Host", "x")
            .header("X-Pad", "abc")
            .body(())
            .unwrap();
        assert_eq!(head_len(&req), raw.len());
    }

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn blob_paths_are_checked() {
        let d = check_path(&format!("/v2/library/alpine/blobs/sha256:{HEX}")).unwrap();
        assert_eq!(d.unwrap().to_string(), format!("sha256:{HEX}"));
        assert_eq!(check_path("/v2/").unwrap(), None);
        assert_eq!(check_path("/v2/a/b/manifests/latest").unwrap(), None);
        assert_eq!(check_path("/v2/a/blobs/uploads/").unwrap(), None);
        assert_eq!(
            check_path("/v2/a/blobs/sha512:abcd").unwrap(),
            None,
            "another algorithm passes through"
        );
        for bad in [
            "/v2/a/blobs/sha256:zz",
            "/v2/a/blobs/sha256:0123",
            "/v2/a/blobs/notadigest",
            "/v2/a/blobs/sha256:../../x",
        ] {
            assert!(
                matches!(check_path(bad), Err(RouteError::Digest(_))),
                "{bad}"
            );
        }
        for bad in [
            "/v2/../etc/blobs/sha256:00",
            "/v2/a/../../b/manifests/x",
            "/v2/%2e%2e/a/blobs/x",
            "/v2/A/manifests/x",
            "/v2//a/manifests/x",
            "/v2/a./manifests/x",
            "/v2/../../x",
        ] {
            assert!(matches!(check_path(bad), Err(RouteError::Name(_))), "{bad}");
        }
    }

    #[test]
    fn upstream_comes_from_ns_then_header_then_default() {
        let cfg = ProxyConfig {
            insecure_registries: vec!["plain:5000".into()],
            ..ProxyConfig::default()
        };
        let up = |q: Option<&str>, h: Option<&str>| mirror_upstream(&cfg, q, h);
        assert_eq!(
            up(Some("ns=reg.example:5000"), None).unwrap(),
            ("https://reg.example:5000".into(), None)
        );
        assert_eq!(
            up(Some("a=1&ns=docker.io&b=2"), None).unwrap(),
            (
                "https://registry-1.docker.io".into(),
                Some("a=1&b=2".into())
            )
        );
        assert_eq!(
            up(Some("ns=plain:5000"), None).unwrap().0,
            "http://plain:5000"
        );
        assert_eq!(
            up(None, Some("http://h:1")).unwrap().0,
            "http://h:1",
            "the header may name a scheme"
        );
        assert_eq!(up(None, Some("quay.io")).unwrap().0, "https://quay.io");
        assert_eq!(up(None, None).unwrap().0, "https://registry-1.docker.io");
        for bad in ["evil.com/x", "user@evil.com", "a b", "h:1?x", ""] {
            let q = format!("ns={bad}");
            assert!(up(Some(&q), None).is_err(), "{bad:?}");
        }
        assert!(up(None, Some("https://evil.com/path")).is_err());
    }

    #[test]
    fn rules_match_paths_and_hosts() {
        let cfg = ProxyConfig {
            intercept: vec![r"^registry\.test:443$".into()],
            ..ProxyConfig::default()
        };
        let r = Rules::new(&cfg).unwrap();
        assert!(r.p2p(&format!("/v2/a/b/blobs/sha256:{HEX}")));
        assert!(!r.p2p(&format!("/v2/a/b/blobs/sha256:{HEX}/x")));
        assert!(!r.p2p("/v2/a/manifests/latest"));
        assert!(r.intercept("registry.test:443"));
        assert!(!r.intercept("other.test:443"));
    }

    #[test]
    fn ranges() {
        let r = |h: &str, len| parse_range(Some(h), len);
        assert_eq!(parse_range(None, 10), Range::Full);
        assert_eq!(r("bytes=0-4", 10), Range::Part { start: 0, end: 4 });
        assert_eq!(r("bytes=5-", 10), Range::Part { start: 5, end: 9 });
        assert_eq!(r("bytes=5-100", 10), Range::Part { start: 5, end: 9 });
        assert_eq!(r("bytes=-3", 10), Range::Part { start: 7, end: 9 });
        assert_eq!(r("bytes=-30", 10), Range::Part { start: 0, end: 9 });
        assert_eq!(r("bytes=10-", 10), Range::Unsatisfiable);
        assert_eq!(r("bytes=-0", 10), Range::Unsatisfiable);
        assert_eq!(r("bytes=0-0", 0), Range::Unsatisfiable);
        assert_eq!(r("bytes=4-2", 10), Range::Full);
        assert_eq!(r("bytes=0-1,3-4", 10), Range::Full);
        assert_eq!(r("items=0-1", 10), Range::Full);
        assert_eq!(r("bytes=x-1", 10), Range::Full);
    }
}

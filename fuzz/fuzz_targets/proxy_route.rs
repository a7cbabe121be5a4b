//! The proxy's routing as it runs: a request head parsed from the input (as hyper's parser,
//! httparse, reads it), then `route::decide` with the default rules, the Hub mirror and
//! interception on, both as it arrives and as if inside an intercepted CONNECT. A request the
//! proxy sends on must name a well-formed upstream.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use starling::config::ProxyConfig;
use starling::proxy::route::{self, Route, Routing, Rules};

fn setup() -> &'static (ProxyConfig, Rules) {
    static S: OnceLock<(ProxyConfig, Rules)> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = ProxyConfig {
            intercept: vec![r"^huggingface\.co:443$".into(), r"\.example:443$".into()],
            ..ProxyConfig::default()
        };
        let rules = Rules::new(&cfg).expect("the default rules compile");
        (cfg, rules)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(parsed.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let mut b = http::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"));
    for h in parsed.headers.iter() {
        b = b.header(h.name, h.value);
    }
    let Ok(req) = b.body(()) else {
        return;
    };
    let (cfg, rules) = setup();
    let r = Routing {
        cfg,
        rules,
        hub_mirror: true,
        can_intercept: true,
    };
    for inside in [None, Some("registry.example:443")] {
        match route::decide(&r, &req, inside) {
            Route::Blob { url, .. } | Route::Pass { url } => {
                let u = url::Url::parse(&url).expect("the upstream URL parses");
                assert!(matches!(u.scheme(), "http" | "https"), "{url}");
                assert!(u.username().is_empty() && u.password().is_none(), "{url}");
                assert!(u.host_str().is_some_and(|h| !h.is_empty()), "{url}");
            }
            Route::Connect { authority, .. } => {
                assert!(route::check_authority(&authority).is_ok(), "{authority}");
            }
            Route::Reject { status, .. } => assert!((400..500).contains(&status)),
            Route::Hub => {}
        }
    }
});

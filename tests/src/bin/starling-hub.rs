//! `starling-hub --root DIR --listen HOST:PORT [--cdn HOST:PORT] [--page-size N]`: the local
//! Hugging Face Hub of the tests and benches (see `starling_tests::hub`). With `--cdn`, a
//! second listener serves the storage backend that LFS redirects point at; `--rate` paces its
//! bodies (bytes per second per response).

use std::net::TcpListener;
use std::sync::Arc;

use starling_tests::hub::Hub;

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut root, mut listen, mut cdn, mut page, mut rate) = (None, None, None, 50usize, 0u64);
    while let Some(a) = args.next() {
        let v = args.next();
        match (a.as_str(), v) {
            ("--root", Some(v)) => root = Some(v),
            ("--listen", Some(v)) => listen = Some(v),
            ("--cdn", Some(v)) => cdn = Some(v),
            ("--page-size", Some(v)) => page = v.parse().unwrap_or(50),
            ("--rate", Some(v)) => rate = v.parse().unwrap_or(0),
            _ => {
                eprintln!("usage: starling-hub --root DIR --listen HOST:PORT [--cdn HOST:PORT] [--page-size N] [--rate BYTES_PER_S]");
                std::process::exit(2);
            }
        }
    }
    let (Some(root), Some(listen)) = (root, listen) else {
        eprintln!("starling-hub: --root and --listen are required");
        std::process::exit(2);
    };
    let l = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("starling-hub: cannot listen on {listen}: {e}");
        std::process::exit(1);
    });
    let hub = Arc::new(Hub::new(
        root.into(),
        cdn.clone().unwrap_or(listen.clone()),
        page,
        rate,
    ));
    if let Some(c) = &cdn {
        let cl = TcpListener::bind(c).unwrap_or_else(|e| {
            eprintln!("starling-hub: cannot listen on {c}: {e}");
            std::process::exit(1);
        });
        hub.serve(cl);
    }
    hub.serve(l);
    println!("starling-hub listening on {listen}");
    loop {
        std::thread::park();
    }
}

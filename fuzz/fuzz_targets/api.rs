//! The local API as the daemon reads it: lines up to the limit, each parsed as a request (the
//! digest and headers of a get are checked while parsing).
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling::daemon::api;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut r = data;
        // Every line of the input, as a client sending several would.
        for _ in 0..16 {
            match api::read_line(&mut r).await {
                Ok(Some(line)) => {
                    if let Ok(req) = api::parse_request(&line) {
                        let text = serde_json::to_string(&req).expect("a request serialises");
                        assert_eq!(api::parse_request(&text).ok(), Some(req));
                    }
                }
                _ => break,
            }
        }
    });
});

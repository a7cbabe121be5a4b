//! The configuration file: TOML, `${VAR}` expansion, and every validation rule. Includes are
//! answered "not found" (a fuzz input must not read the machine's files).
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("/etc/starling/config.toml");
    let not_found = |_: &std::path::Path| Err(std::io::ErrorKind::NotFound.into());
    if let Ok(cfg) = Config::parse(path, text, not_found) {
        // What start-up derives from a valid configuration must not panic either.
        let _ = cfg.socket_path();
        let _ = cfg.check_data_dir();
    }
});

//! The configuration loader on any text: parse, validate, and a parsed
//! configuration survives being written out and read back.
#![no_main]

use std::path::Path;

use interceptor::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::from_toml(text, Path::new("fuzz.toml")) else { return };
    let valid = config.validate().is_ok();
    let written = toml::to_string(&config).expect("a parsed configuration serializes");
    let again = Config::from_toml(&written, Path::new("written.toml"))
        .unwrap_or_else(|e| panic!("written configuration does not parse: {e:?}\n{written}"));
    assert_eq!(again, config, "round trip changed the configuration\n{written}");
    assert_eq!(again.validate().is_ok(), valid);
});

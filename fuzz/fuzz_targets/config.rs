//! Config text (TOML) and environment-only configuration: never a panic, and an error
//! never quotes a secret's value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use token_proxy::config::{env::from_env, Config};

const SECRET: &str = "fuzz-secret-value-9d2c";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // `${S}` expands to a secret: wherever the fuzzer puts it, no error may print it.
    let env = |name: &str| (name == "S").then(|| SECRET.to_string());
    // (Written into the text itself, e.g. as a `grant` value, the string is no secret: an
    // error may quote it. libFuzzer learns the constant from comparisons and does that.)
    let literal = text.contains(SECRET);
    for result in [Config::parse(text, &env), Config::parse_literal(text, &|_| None)] {
        if let Err(e) = result {
            assert!(literal || !e.to_string().contains(SECRET), "{e}");
        }
    }
    // The same bytes as `NAME=value` lines of TOKEN_PROXY_* variables.
    let vars: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("TOKEN_PROXY_{k}"), v.to_string()))
        .collect();
    let lookup = |name: &str| {
        vars.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let _ = from_env(&lookup);
});

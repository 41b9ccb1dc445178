//! Property tests (proptest) over the parsers that take outside input: whatever bytes arrive,
//! they return an error instead of panicking, and errors never echo the input (it may be a
//! token).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use proptest::prelude::*;
use token_proxy::config::Config;
use token_proxy::routes::{rewrite_request_headers, strip_hop_by_hop};
use token_proxy::token::response::{parse_handed_over, parse_token_response};

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn token_responses_never_panic_or_echo(secret in "[a-zA-Z0-9]{24}", junk in any::<Vec<u8>>()) {
        let mut body = junk.clone();
        body.extend_from_slice(secret.as_bytes());
        for parsed in [parse_token_response(&body, now()).map(|_| ()).map_err(|e| e.to_string()), parse_handed_over(&body, now()).map(|_| ())] {
            if let Err(e) = parsed {
                prop_assert!(!e.contains(&secret), "error echoes input: {e}");
            }
        }
    }

    #[test]
    fn json_token_responses_with_odd_fields(
        token in "[ -~]{0,40}",
        expires in prop_oneof![Just(serde_json::Value::Null), any::<f64>().prop_map(serde_json::Value::from), "[ -~]{0,8}".prop_map(serde_json::Value::from), any::<i64>().prop_map(serde_json::Value::from)],
        token_type in prop_oneof![Just("Bearer".to_string()), "[a-zA-Z]{0,8}"],
    ) {
        let body = serde_json::json!({"access_token": token, "expires_in": expires, "token_type": token_type}).to_string();
        if let Ok(set) = parse_token_response(body.as_bytes(), now()) {
            if let Some(at) = set.expires_at {
                prop_assert!(at >= now());
            }
        }
    }

    #[test]
    fn config_text_never_panics(text in "[ -~\n]{0,400}") {
        let _ = Config::parse(&text, &|_| None);
    }

    #[test]
    fn config_values_of_any_kind_never_panic(
        key in prop::sample::select(vec!["listen", "shutdown_grace", "max_header_size", "admin_listen"]),
        value in "[ -~]{0,30}",
    ) {
        let text = format!("[server]\n{key} = {:?}\n[[routes]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n", value);
        let _ = Config::parse(&text, &|_| None);
    }

    #[test]
    fn header_rewrite_leaves_exactly_one_token_and_no_hop_by_hop(
        names in prop::collection::vec("[a-z][a-z0-9-]{0,12}", 0..12),
        connection in "[a-z, -]{0,40}",
    ) {
        let mut headers = HeaderMap::new();
        for n in &names {
            if let Ok(name) = HeaderName::from_bytes(n.as_bytes()) {
                headers.append(name, HeaderValue::from_static("v"));
            }
        }
        if let Ok(v) = HeaderValue::from_str(&connection) {
            headers.insert("connection", v);
        }
        headers.append(AUTHORIZATION, HeaderValue::from_static("Bearer apps"));
        let ours = HeaderValue::from_static("Bearer ours");
        rewrite_request_headers(&mut headers, Some((&AUTHORIZATION, &ours)));
        let auth: Vec<_> = headers.get_all(AUTHORIZATION).iter().collect();
        prop_assert_eq!(auth, vec![&ours]);
        for hop in ["connection", "transfer-encoding", "upgrade", "te", "keep-alive", "proxy-authorization"] {
            prop_assert!(headers.get(hop).is_none());
        }
        for named in connection.split(',').map(str::trim).filter(|s| !s.is_empty() && *s != "authorization") {
            prop_assert!(headers.get(named).is_none(), "{named} was listed in Connection");
        }
        let mut again = headers.clone();
        strip_hop_by_hop(&mut again);
        prop_assert_eq!(again, headers, "idempotent");
    }
}

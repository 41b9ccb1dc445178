//! The README's first command: `token-proxy demo` runs an embedded token server, upstream
//! and proxy, crosses token expiry many times, and ends with no client-visible failure.

mod support;

use support::run_binary;

#[test]
fn the_demo_ends_with_no_client_visible_failures() {
    let (code, out, err) = run_binary(&["demo"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} line in:\n{out}"))
            .split_whitespace()
            .last()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(line("client-visible failures"), 0, "{out}");
    assert_eq!(line("refresh tokens reused"), 0, "{out}");
    assert!(line("token refreshes") >= 3, "{out}");
    assert!(line("401s replayed by the proxy") >= 1, "{out}");
    assert_eq!(
        line("answered 200"),
        line("requests sent by the app"),
        "{out}"
    );
}

//! `cargo xtask demo` runs to completion and shows the three decisions.

use interceptor::testing::require_privileges;

#[test]
fn the_demo_shows_allowed_redacted_and_blocked_requests() {
    if !require_privileges("the_demo_shows_allowed_redacted_and_blocked_requests") {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_demo")).output().expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for needle in [
        "1. allowed",
        "-> 200 (certificate issuer: CN=interceptor CA",
        "2. redacted",
        "[REDACTED:credit_card]",
        "3. blocked",
        "-> 403 {\"error\":",
        "provider called: false",
        "4. streamed",
        "cleaned up",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    for decision in ["allow", "modify", "block"] {
        assert!(
            text.lines().any(|l| l.contains("request") && l.contains(decision)),
            "no {decision} audit event:\n{text}"
        );
    }
    assert!(!text.contains("4111 1111 1111 1111\"\n"), "the provider must not see the card");
}

//! Runs `cargo test` while echoing its output, and keeps what a reader of the last lines of
//! a long CI log needs: which tests failed and why, and which skipped themselves.
//!
//! A test that cannot run here (not root, a tool missing) returns early after printing
//! `SKIPPED: <test>: <reason>` to stderr (`interceptor::testing::skip`); libtest counts it
//! as passed, so those lines are what tell the two apart.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow};

use crate::cmd;

/// Lines of a failed test's panic kept for the summary.
const PANIC_LINES: usize = 4;
/// The line a skipped test prints (`interceptor::testing::SKIP_MARKER`).
const SKIP_MARKER: &str = "SKIPPED: ";

/// A failed test and the start of its panic message.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    pub test: String,
    pub reason: Vec<String>,
}

/// A test that skipped itself, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub test: String,
    pub reason: String,
}

/// What one `cargo test` run did.
#[derive(Debug, Default)]
pub struct Tally {
    /// Tests libtest reported as passed, the skipped ones included.
    pub passed: usize,
    pub skipped: Vec<Skip>,
    /// Why the run failed; `None` when it passed.
    pub error: Option<anyhow::Error>,
}

impl Tally {
    /// Tests that passed and really ran.
    pub fn ran(&self) -> usize {
        self.passed.saturating_sub(self.skipped.len())
    }
}

/// Runs a `cargo test` command with stdout and stderr echoed line by line. Counts passed
/// and skipped tests; on failure the error names every failed test with the first lines
/// of its panic.
pub fn run(cmd: &mut Command) -> Tally {
    let line = cmd::display(cmd);
    println!("+ {line}");
    let mut parser = Parser::default();
    let result = run_parsed(cmd, &line, &mut parser);
    let (passed, skipped, failures) = parser.finish();
    let error = match result {
        Ok(status) if status.success() => None,
        Ok(status) if failures.is_empty() => Some(anyhow!("`{line}` failed ({status})")),
        Ok(status) => {
            Some(anyhow!("`{line}` failed ({status}); {} test(s) failed:\n{}", failures.len(), render(&failures)))
        }
        Err(error) => Some(error),
    };
    Tally { passed, skipped, error }
}

fn run_parsed(cmd: &mut Command, line: &str, parser: &mut Parser) -> Result<std::process::ExitStatus> {
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("cannot start `{line}`"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let stderr = child.stderr.take().context("child stderr")?;
    // stderr on its own thread: a child blocked writing one pipe must not stall the other.
    let skips = std::thread::spawn(move || {
        let mut skips = Vec::new();
        for text in BufReader::new(stderr).lines() {
            let Ok(text) = text else { break };
            eprintln!("{text}");
            skips.extend(parse_skip(&text));
        }
        skips
    });
    for text in BufReader::new(stdout).lines() {
        let text = text.context("reading test output")?;
        println!("{text}");
        parser.line(&text);
    }
    let status = child.wait().with_context(|| format!("waiting for `{line}`"))?;
    parser.skipped.extend(skips.join().map_err(|_| anyhow!("the stderr reader panicked"))?);
    Ok(status)
}

/// `SKIPPED: <test>: <reason>`, anywhere in a line (a child's output may precede it).
fn parse_skip(text: &str) -> Option<Skip> {
    let rest = &text[text.find(SKIP_MARKER)? + SKIP_MARKER.len()..];
    let (test, reason) = rest.split_once(": ").unwrap_or((rest, ""));
    Some(Skip { test: test.trim().to_owned(), reason: reason.trim().to_owned() })
}

/// `test result: ok. 12 passed; 0 failed; ...`: the passed count.
fn parse_passed(text: &str) -> Option<usize> {
    let rest = text.strip_prefix("test result: ")?;
    let (_, counts) = rest.split_once(". ")?;
    counts.split("; ").find_map(|part| part.strip_suffix(" passed")?.trim().parse().ok())
}

/// Skipped tests grouped by reason, for the summary: `(reason, tests)`.
pub fn group_skips(skips: &[Skip]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for skip in skips {
        match groups.iter_mut().find(|(reason, _)| *reason == skip.reason) {
            Some((_, tests)) => tests.push(skip.test.clone()),
            None => groups.push((skip.reason.clone(), vec![skip.test.clone()])),
        }
    }
    groups
}

fn render(failures: &[Failure]) -> String {
    let mut out = String::new();
    for failure in failures {
        out.push_str(&format!("    {}\n", failure.test));
        for reason in &failure.reason {
            out.push_str(&format!("        {reason}\n"));
        }
    }
    out.trim_end().to_owned()
}

/// Reads libtest's output: `test NAME ... FAILED` lines, then the `---- NAME stdout ----`
/// sections that hold each failure's captured output and panic.
#[derive(Default)]
struct Parser {
    passed: usize,
    skipped: Vec<Skip>,
    failures: Vec<Failure>,
    /// Index into `failures` of the section being read, and whether its panic started.
    section: Option<(usize, bool)>,
}

impl Parser {
    fn line(&mut self, text: &str) {
        if let Some(passed) = parse_passed(text) {
            self.passed += passed;
        }
        if let Some(name) = text.strip_prefix("test ").and_then(|rest| rest.strip_suffix(" ... FAILED")) {
            self.failures.push(Failure { test: name.to_owned(), reason: Vec::new() });
            return;
        }
        if let Some(name) = text.strip_prefix("---- ").and_then(|rest| rest.strip_suffix(" stdout ----")) {
            self.section = self.failures.iter().position(|failure| failure.test == name).map(|i| (i, false));
            return;
        }
        if text == "failures:" || text.starts_with("test result:") {
            self.section = None;
            return;
        }
        let Some((index, panicking)) = self.section.as_mut() else { return };
        if text.contains("panicked at") {
            *panicking = true;
            return;
        }
        let reason = &mut self.failures[*index].reason;
        if *panicking && !text.trim().is_empty() && reason.len() < PANIC_LINES {
            reason.push(text.trim().to_owned());
        }
    }

    fn finish(self) -> (usize, Vec<Skip>, Vec<Failure>) {
        (self.passed, self.skipped, self.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_tests_keep_the_start_of_their_panic() {
        let output = "\
running 3 tests
test a::passes ... ok
test failsafe_kill ... FAILED
test other::fails ... FAILED

failures:

---- failsafe_kill stdout ----
interceptor log line
thread 'failsafe_kill' panicked at tests/tests/failsafe.rs:10:5:
no direct connection within 2s
left: 1
right: 2
more
and more

---- other::fails stdout ----
note: run with `RUST_BACKTRACE=1`

failures:
    failsafe_kill
    other::fails

test result: FAILED. 1 passed; 2 failed; 0 ignored
";
        let mut parser = Parser::default();
        output.lines().for_each(|line| parser.line(line));
        let (passed, _, failures) = parser.finish();
        assert_eq!(passed, 1);
        assert_eq!(
            failures,
            vec![
                Failure {
                    test: "failsafe_kill".into(),
                    reason: vec![
                        "no direct connection within 2s".into(),
                        "left: 1".into(),
                        "right: 2".into(),
                        "more".into()
                    ],
                },
                Failure { test: "other::fails".into(), reason: vec![] },
            ]
        );
        assert_eq!(
            render(&failures),
            "    failsafe_kill\n        no direct connection within 2s\n        left: 1\n        right: 2\n        more\n    other::fails"
        );
    }

    #[test]
    fn skipped_tests_are_counted_and_grouped() {
        let mut parser = Parser::default();
        for line in
            ["test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured", "test result: ok. 2 passed; 0 failed"]
        {
            parser.line(line);
        }
        let lines = [
            "SKIPPED: redirect_tcp: privileged test cannot run: not running as root (euid is not 0)",
            "unrelated log line",
            "interceptor log without newline SKIPPED: dns_loop: privileged test cannot run: not running as root (euid is not 0)",
            "SKIPPED: manifests_validate: not installed: kubernetes-validate",
            "SKIPPED: bare",
        ];
        parser.skipped.extend(lines.iter().filter_map(|l| parse_skip(l)));
        let (passed, skipped, failures) = parser.finish();
        assert!(failures.is_empty());
        let tally = Tally { passed, skipped, error: None };
        assert_eq!((tally.passed, tally.skipped.len(), tally.ran()), (5, 4, 1));
        assert_eq!(tally.skipped[3], Skip { test: "bare".into(), reason: String::new() });
        let groups = group_skips(&tally.skipped);
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0].0, "privileged test cannot run: not running as root (euid is not 0)");
        assert_eq!(groups[0].1, ["redirect_tcp", "dns_loop"]);
        assert_eq!(groups[1].1, ["manifests_validate"]);
        assert_eq!(parse_passed("test result: FAILED. 1 passed; 2 failed; 0 ignored"), Some(1));
        assert_eq!(parse_passed("test foo ... ok"), None);
    }

    #[test]
    fn a_real_command_is_tallied() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'test a ... ok'; echo 'SKIPPED: a: no root' >&2; echo 'test result: ok. 2 passed; 0 failed'",
        ]);
        let tally = run(&mut cmd);
        assert!(tally.error.is_none());
        assert_eq!((tally.passed, tally.ran()), (2, 1));
        assert_eq!(tally.skipped, [Skip { test: "a".into(), reason: "no root".into() }]);

        let mut failing = Command::new("sh");
        failing.args(["-c", "echo 'test b ... FAILED'; exit 101"]);
        let tally = run(&mut failing);
        assert!(format!("{:#}", tally.error.unwrap()).contains("1 test(s) failed"));
    }
}

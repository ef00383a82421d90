//! Runs `cargo test` while echoing its output, and keeps what a reader of the last lines of
//! a long CI log needs: which tests failed and why.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Lines of a failed test's panic kept for the summary.
const PANIC_LINES: usize = 4;

/// A failed test and the start of its panic message.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    pub test: String,
    pub reason: Vec<String>,
}

/// Runs a `cargo test` command with stdout echoed line by line; on failure the error names
/// every failed test with the first lines of its panic.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = cmd::display(cmd);
    println!("+ {line}");
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("cannot start `{line}`"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut parser = Parser::default();
    for text in BufReader::new(stdout).lines() {
        let text = text.context("reading test output")?;
        println!("{text}");
        parser.line(&text);
    }
    let status = child.wait().with_context(|| format!("waiting for `{line}`"))?;
    if status.success() {
        return Ok(());
    }
    let failures = parser.finish();
    if failures.is_empty() {
        bail!("`{line}` failed ({status})");
    }
    bail!("`{line}` failed ({status}); {} test(s) failed:\n{}", failures.len(), render(&failures))
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
    failures: Vec<Failure>,
    /// Index into `failures` of the section being read, and whether its panic started.
    section: Option<(usize, bool)>,
}

impl Parser {
    fn line(&mut self, text: &str) {
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

    fn finish(self) -> Vec<Failure> {
        self.failures
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
        let failures = parser.finish();
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
}

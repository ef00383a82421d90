//! Privileged tests that try, as an attacker would, to get a prompt past inspection.

mod starvation;

//! One domain pattern: parsing with validation, and matching against a
//! normalized server name. The syntax is documented on the parent module.

use std::net::Ipv4Addr;

/// Longest DNS name in text form, without the trailing dot.
pub(super) const MAX_NAME_LEN: usize = 253;
pub(super) const MAX_LABEL_LEN: usize = 63;

/// How a pattern matches one label of a name.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Label {
    /// The label itself, lowercase.
    Literal(Box<str>),
    /// `*`: exactly one label, any content.
    Any,
    /// `*-api`: exactly one label ending in `-api`, with at least one
    /// character before it.
    Suffix(Box<str>),
}

impl Label {
    fn matches(&self, label: &str) -> bool {
        match self {
            Self::Literal(l) => **l == *label,
            Self::Any => !label.is_empty(),
            Self::Suffix(s) => label.len() > s.len() && label.ends_with(&**s),
        }
    }
}

/// How many labels a name may have to the left of the pattern's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Extra {
    /// Exactly the pattern's labels.
    None,
    /// Leading dot: none or any number.
    AnyNumber,
    /// Leading `*.`: one or more.
    AtLeastOne,
}

/// The shape of a pattern, least specific first (the order matters: it is
/// the last specificity criterion after label counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Form {
    LeadingDot,
    Wildcard,
    Exact,
}

/// Compared field by field, in declaration order: the greater is the more
/// specific.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Specificity {
    literal_labels: usize,
    suffix_labels: usize,
    form: Form,
}

/// A parsed, validated pattern.
#[derive(Clone, Debug)]
pub(super) struct Pattern {
    extra: Extra,
    /// Right to left (`com`, `openai`, `api`), the order names are walked in.
    labels: Vec<Label>,
    /// Lowercase, trailing dot removed, leading dot kept.
    normalized: String,
    specificity: Specificity,
}

impl Pattern {
    /// Parses one pattern; the error says what is wrong with it, without
    /// repeating the pattern.
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        if let Some(c) = text.chars().find(|c| !c.is_ascii()) {
            return Err(format!("non-ASCII character {c:?}; write internationalized names in their xn-- form"));
        }
        if text.contains("://") || text.contains('/') {
            return Err("looks like a URL; give only the host name".to_string());
        }
        let lower = text.to_ascii_lowercase();
        let trimmed = lower.strip_suffix('.').unwrap_or(&lower);
        let (leading_dot, body) = match trimmed.strip_prefix('.') {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        if body.is_empty() {
            return Err("empty pattern".to_string());
        }
        if body.len() > MAX_NAME_LEN {
            return Err(format!("longer than {MAX_NAME_LEN} characters"));
        }
        if body.parse::<Ipv4Addr>().is_ok() {
            return Err("an IP address; patterns match TLS server names (use targets.cidrs for addresses)".to_string());
        }

        let mut extra = if leading_dot { Extra::AnyNumber } else { Extra::None };
        let mut labels = Vec::new();
        for (i, label) in body.split('.').enumerate() {
            if label.is_empty() {
                return Err("empty label (two dots in a row?)".to_string());
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(format!("label longer than {MAX_LABEL_LEN} characters"));
            }
            if label == "*" {
                if i > 0 {
                    labels.push(Label::Any);
                } else if leading_dot {
                    return Err("a leading dot followed by \"*\" is ambiguous; write \"*.example.com\" \
                         (subdomains only) or \".example.com\" (the domain and its subdomains)"
                        .to_string());
                } else {
                    extra = Extra::AtLeastOne;
                }
                continue;
            }
            let (is_suffix, chars) = match label.strip_prefix('*') {
                Some(rest) => (true, rest),
                None => (false, label),
            };
            if chars.contains('*') {
                return Err("\"*\" must be a whole label (\"*.example.com\") or start one \
                            (\"*-api.example.com\")"
                    .to_string());
            }
            if let Some(c) = chars.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
                return Err(if c == ':' {
                    "has a ':'; give only the host name, without a port".to_string()
                } else {
                    format!("bad character {c:?}; names hold only letters, digits, '-' and '_'")
                });
            }
            labels.push(if is_suffix { Label::Suffix(chars.into()) } else { Label::Literal(chars.into()) });
        }
        labels.reverse();
        if !matches!(labels.first(), Some(Label::Literal(_))) {
            return Err("the last label must be literal (\"*.example.com\", not \"example.*\")".to_string());
        }

        let literal_labels = labels.iter().filter(|l| matches!(l, Label::Literal(_))).count();
        let suffix_labels = labels.iter().filter(|l| matches!(l, Label::Suffix(_))).count();
        let form = if extra == Extra::AnyNumber {
            Form::LeadingDot
        } else if extra == Extra::AtLeastOne || literal_labels < labels.len() {
            Form::Wildcard
        } else {
            Form::Exact
        };
        let normalized = if leading_dot { format!(".{body}") } else { body.to_string() };
        Ok(Self { extra, labels, normalized, specificity: Specificity { literal_labels, suffix_labels, form } })
    }

    /// The name this pattern matches, if it matches exactly one.
    pub(super) fn exact_name(&self) -> Option<&str> {
        (self.specificity.form == Form::Exact).then_some(self.normalized.as_str())
    }

    /// The narrowest DNS subtree holding every name this pattern matches:
    /// its literal labels from the right up to the first wildcard
    /// (`api.openai.com` → itself, `.openai.com` → `openai.com`,
    /// `*.githubcopilot.com` → `githubcopilot.com`,
    /// `bedrock-runtime.*.amazonaws.com` → `amazonaws.com`).
    pub(super) fn literal_suffix(&self) -> String {
        let mut labels: Vec<&str> = Vec::new();
        for label in &self.labels {
            match label {
                Label::Literal(l) => labels.push(l),
                Label::Any | Label::Suffix(_) => break,
            }
        }
        labels.reverse();
        labels.join(".")
    }

    pub(super) fn normalized(&self) -> &str {
        &self.normalized
    }

    pub(super) fn specificity(&self) -> Specificity {
        self.specificity
    }

    /// `name` must be normalized (see `normalize_sni` in the parent module).
    pub(super) fn matches(&self, name: &str) -> bool {
        let mut rest = name.rsplit('.');
        for label in &self.labels {
            match rest.next() {
                Some(got) if label.matches(got) => {}
                _ => return false,
            }
        }
        match self.extra {
            Extra::None => rest.next().is_none(),
            Extra::AnyNumber => true,
            Extra::AtLeastOne => rest.next().is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, name: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(name)
    }

    #[test]
    fn each_form_matches_what_the_syntax_says() {
        let cases: &[(&str, &str, bool)] = &[
            // exact
            ("api.openai.com", "api.openai.com", true),
            ("api.openai.com", "openai.com", false),
            ("api.openai.com", "x.api.openai.com", false),
            ("api.openai.com", "api.openai.com.evil.com", false),
            // leading dot: the domain and any depth of subdomain
            (".openai.com", "openai.com", true),
            (".openai.com", "api.openai.com", true),
            (".openai.com", "a.b.openai.com", true),
            (".openai.com", "evilopenai.com", false),
            (".openai.com", "openai.com.evil.com", false),
            // `*` inside: exactly one label
            ("bedrock-runtime.*.amazonaws.com", "bedrock-runtime.us-east-1.amazonaws.com", true),
            ("bedrock-runtime.*.amazonaws.com", "bedrock-runtime.a.b.amazonaws.com", false),
            ("bedrock-runtime.*.amazonaws.com", "bedrock-runtime.amazonaws.com", false),
            ("bedrock-runtime.*.amazonaws.com", "x.bedrock-runtime.us-east-1.amazonaws.com", false),
            // leading `*.`: one or more labels
            ("*.githubcopilot.com", "api.githubcopilot.com", true),
            ("*.githubcopilot.com", "api.individual.githubcopilot.com", true),
            ("*.githubcopilot.com", "githubcopilot.com", false),
            ("*.githubcopilot.com", "evilgithubcopilot.com", false),
            // `*suffix`: one label ending in the suffix
            ("*-aiplatform.googleapis.com", "us-central1-aiplatform.googleapis.com", true),
            ("*-aiplatform.googleapis.com", "-aiplatform.googleapis.com", false),
            ("*-aiplatform.googleapis.com", "aiplatform.googleapis.com", false),
            ("*-aiplatform.googleapis.com", "a.us-aiplatform.googleapis.com", false),
            // case and trailing dot of the pattern are ignored
            ("API.OpenAI.com.", "api.openai.com", true),
            (".OpenAI.COM.", "api.openai.com", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(matches(pattern, name), *expected, "{pattern:?} vs {name:?}");
        }
    }

    #[test]
    fn forms_and_specificity() {
        let spec = |p: &str| Pattern::parse(p).unwrap().specificity();
        assert_eq!(spec("api.openai.com").form, Form::Exact);
        assert_eq!(spec("*.openai.com").form, Form::Wildcard);
        assert_eq!(spec("a.*.openai.com").form, Form::Wildcard);
        assert_eq!(spec("*-x.openai.com").form, Form::Wildcard);
        assert_eq!(spec(".openai.com").form, Form::LeadingDot);
        assert!(spec("api.openai.com") > spec(".api.openai.com"));
        assert!(spec(".api.openai.com") > spec("*.openai.com"));
        assert!(spec("*.openai.com") > spec(".openai.com"));
        assert!(spec("*-api.openai.com") > spec("*.openai.com"));
        assert!(spec("a.*.openai.com") > spec("*-api.openai.com"));
    }

    #[test]
    fn exact_name_only_for_exact_patterns() {
        let exact = |p: &str| Pattern::parse(p).unwrap().exact_name().map(str::to_owned);
        assert_eq!(exact("API.openai.com."), Some("api.openai.com".to_string()));
        assert_eq!(exact(".openai.com"), None);
        assert_eq!(exact("*.openai.com"), None);
        assert_eq!(exact("a.*.openai.com"), None);
        assert_eq!(exact("*-a.openai.com"), None);
    }

    #[test]
    fn invalid_patterns_are_rejected_with_a_reason() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            (".", "empty"),
            ("..", "empty"),
            ("a..com", "empty label"),
            ("..a.com", "empty label"),
            ("a*b.com", "whole label"),
            ("ab*.com", "whole label"),
            ("**.com", "whole label"),
            ("*", "last label"),
            ("*.*", "last label"),
            ("example.*", "last label"),
            ("example.*-x", "last label"),
            (".*.example.com", "ambiguous"),
            ("api openai.com", "bad character"),
            ("api.openai.com:443", "port"),
            ("https://api.openai.com", "URL"),
            ("api.openai.com/v1", "URL"),
            ("bücher.de", "xn--"),
            ("192.0.2.1", "IP address"),
            (&long_label, "63"),
            (&long_name, "253"),
        ];
        for (pattern, reason) in cases {
            let err = Pattern::parse(pattern).expect_err(pattern);
            assert!(err.contains(reason), "{pattern:?}: {err}");
        }
    }

    #[test]
    fn names_at_the_length_limits_are_accepted() {
        let label = format!("{}.com", "a".repeat(63));
        Pattern::parse(&label).unwrap();
        let name = format!("{}com", "abcdefghi.".repeat(25));
        assert_eq!(name.len(), 253);
        Pattern::parse(&name).unwrap();
        Pattern::parse("xn--bcher-kva.de").unwrap();
        Pattern::parse("_dmarc.example.com").unwrap();
        Pattern::parse("1.2.3.com").unwrap();
    }
}

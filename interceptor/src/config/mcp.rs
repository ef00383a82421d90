//! Settings of MCP (Model Context Protocol) inspection (`[mcp]`): typed
//! values, their documented defaults and their validation. The pipeline and
//! the redirect use them; this module does no I/O and imports nothing from
//! the crate.

use std::{fmt, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Well-known hosted MCP servers, intercepted by default. Setting
/// `mcp.domains` replaces the list; `mcp.domains_extra` adds to it.
pub const DEFAULT_MCP_DOMAINS: &[&str] = &[
    "mcp.notion.com",
    "mcp.linear.app",
    "mcp.atlassian.com",
    "mcp.sentry.dev",
    "mcp.stripe.com",
    "mcp.paypal.com",
    "mcp.asana.com",
    "mcp.intercom.com",
    "mcp.neon.tech",
    "mcp.supabase.com",
    "mcp.vercel.com",
    "mcp.zapier.com",
    "mcp.deepwiki.com",
    "mcp.context7.com",
    "mcp.squareup.com",
    "mcp.webflow.com",
    "mcp.canva.com",
    "mcp.hubspot.com",
    "*.mcp.cloudflare.com",
];

/// What to do when a server's definition of a tool it listed before changes
/// (a "rug pull").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolChangeAction {
    /// Let the new list through and record the change.
    Alert,
    /// Answer the `tools/list` with a JSON-RPC error; the pinned definitions
    /// stay until an operator accepts the change.
    Block,
}

/// A plain-HTTP MCP server: a name or address, and its port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PlainTarget {
    /// Lowercase host name, or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl fmt::Display for PlainTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl PlainTarget {
    /// Parses `host:port` or `[v6]:port`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, port) = rest.split_once("]:").ok_or_else(|| format!("{s:?}: expected [address]:port"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{s:?}: {host:?} is not an IPv6 address"));
            }
            (host.to_owned(), port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected host:port"))?;
            if host.contains(':') {
                return Err(format!("{s:?}: write an IPv6 address in brackets, [address]:port"));
            }
            if host.parse::<std::net::Ipv4Addr>().is_err() && !valid_host_name(host) {
                return Err(format!("{s:?}: {host:?} is not a host name or an IPv4 address"));
            }
            (host.to_ascii_lowercase(), port)
        };
        let port = match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("{s:?}: {port:?} is not a port (1-65535)")),
            Ok(p) => p,
        };
        Ok(Self { host, port })
    }
}

fn valid_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct McpConfig {
    /// Inspect MCP traffic: tool calls, their results, tool lists,
    /// resources, prompts and sampling requests. Off: MCP servers' names are
    /// not intercepted, and MCP requests to AI domains are inspected as
    /// plain JSON.
    pub enabled: bool,
    /// MCP server names, intercepted like AI domains (same syntax).
    /// Default: [`DEFAULT_MCP_DOMAINS`]; setting it replaces the list.
    pub domains: Vec<String>,
    /// More MCP server names, added to `domains`.
    pub domains_extra: Vec<String>,
    /// Plain-HTTP MCP servers, `host:port` (`127.0.0.1:8931`,
    /// `tools.agents.svc.cluster.local:8080`): redirected and inspected
    /// without TLS.
    pub plain: Vec<String>,
    /// Inspect as MCP any intercepted request that looks like MCP
    /// (JSON-RPC 2.0 with an MCP method, an `Mcp-Session-Id` header, the
    /// streamable-HTTP `Accept`), whatever its host.
    pub detect_by_content: bool,
    /// A tool whose definition changed since it was first seen.
    pub tool_changes: ToolChangeAction,
    /// Where the tool definitions seen per server and workload are kept.
    /// Empty: `mcp-tool-pins.json` in the state directory.
    pub pins_file: PathBuf,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            domains: DEFAULT_MCP_DOMAINS.iter().map(|d| d.to_string()).collect(),
            domains_extra: Vec::new(),
            plain: Vec::new(),
            detect_by_content: true,
            tool_changes: ToolChangeAction::Alert,
            pins_file: PathBuf::new(),
        }
    }
}

impl McpConfig {
    /// Every MCP server name: `domains` then `domains_extra`.
    pub fn all_domains(&self) -> impl Iterator<Item = &str> {
        self.domains.iter().chain(&self.domains_extra).map(String::as_str)
    }

    /// The plain-HTTP servers, parsed. Only valid after [`Self::validate`]
    /// (an invalid entry is left out).
    pub fn plain_targets(&self) -> Vec<PlainTarget> {
        self.plain.iter().filter_map(|p| PlainTarget::parse(p).ok()).collect()
    }

    /// Every problem with these settings, each prefixed with its field. The
    /// domain patterns are checked with the domain policy's.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for entry in &self.plain {
            if let Err(why) = PlainTarget::parse(entry) {
                errors.push(format!("mcp.plain: {why}"));
            }
        }
        if !self.pins_file.as_os_str().is_empty() && !self.pins_file.is_absolute() {
            errors.push(format!("mcp.pins_file: {} must be an absolute path", self.pins_file.display()));
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_targets_parse_names_addresses_and_ports() {
        let t = |s: &str| PlainTarget::parse(s);
        assert_eq!(t("127.0.0.1:8931").unwrap(), PlainTarget { host: "127.0.0.1".into(), port: 8931 });
        assert_eq!(t("Tools.svc.cluster.local:80").unwrap().host, "tools.svc.cluster.local");
        assert_eq!(t("[::1]:9000").unwrap(), PlainTarget { host: "::1".into(), port: 9000 });
        assert_eq!(t("[::1]:9000").unwrap().to_string(), "[::1]:9000");
        for bad in ["localhost", "::1:80", "host:0", "host:70000", "http://x:80", "[x]:1", ":80", "a b:1"] {
            assert!(t(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn validation_names_the_field_and_entry() {
        let cfg = McpConfig { plain: vec!["nope".into()], pins_file: "rel.json".into(), ..Default::default() };
        let errors = cfg.validate();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("mcp.plain: \"nope\""), "{errors:?}");
        assert!(errors[1].starts_with("mcp.pins_file:"), "{errors:?}");
    }
}

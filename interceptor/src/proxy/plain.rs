//! Plain-HTTP MCP servers (`mcp.plain`): which original destinations are
//! one, and under which name. A connection to one is known by its original
//! destination alone (there is no ClientHello to wait for): it is served as
//! HTTP/1.1 without TLS and relayed as plain HTTP to that destination,
//! through the guardrail hook like an intercepted TLS connection. Pure: the
//! control plane fills the table from the configured targets (names
//! resolved like the AI domains) and publishes it in the snapshot.

use std::{collections::HashMap, net::SocketAddr};

use crate::net;

/// Resolved plain MCP targets: exact (address, port) → the configured host
/// (a name, or the address as written).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlainTargets {
    by_addr: HashMap<SocketAddr, String>,
}

impl PlainTargets {
    /// The table of `(address, host)` pairs; addresses are canonical
    /// (IPv4-mapped IPv6 as IPv4), the first host given for an address wins.
    pub fn new(pairs: impl IntoIterator<Item = (SocketAddr, String)>) -> Self {
        let mut by_addr = HashMap::new();
        for (addr, host) in pairs {
            by_addr.entry(net::canonical(addr)).or_insert(host);
        }
        Self { by_addr }
    }

    /// The configured host of a plain MCP target at exactly this address
    /// and port, if it is one. Another port of the same address is not.
    pub fn name(&self, dst: SocketAddr) -> Option<&str> {
        self.by_addr.get(&net::canonical(dst)).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// Every (address, port).
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.by_addr.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_address_and_port_is_a_plain_target() {
        let t = PlainTargets::new([
            ("127.0.0.1:8931".parse().unwrap(), "127.0.0.1".to_string()),
            ("10.1.2.3:8080".parse().unwrap(), "tools.agents.svc".to_string()),
        ]);
        assert_eq!(t.name("127.0.0.1:8931".parse().unwrap()), Some("127.0.0.1"));
        assert_eq!(t.name("10.1.2.3:8080".parse().unwrap()), Some("tools.agents.svc"));
        assert_eq!(t.name("[::ffff:10.1.2.3]:8080".parse().unwrap()), Some("tools.agents.svc"), "v4-mapped");
        assert_eq!(t.name("127.0.0.1:8932".parse().unwrap()), None, "another port");
        assert_eq!(t.name("127.0.0.2:8931".parse().unwrap()), None, "another address");
        assert_eq!(t.name("10.1.2.3:443".parse().unwrap()), None);
    }

    #[test]
    fn the_first_name_given_for_an_address_wins() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let t = PlainTargets::new([(a, "one.svc".to_string()), (a, "two.svc".to_string())]);
        assert_eq!(t.name(a), Some("one.svc"));
        assert_eq!(t.len(), 1);
    }
}

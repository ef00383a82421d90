//! X.509 name constraints on our CA: the names it may sign for.
//!
//! A CA that a whole cluster trusts must not be a key to every name. The
//! cluster CA carries a critical name constraints extension: permitted DNS
//! subtrees limited to the intercepted AI domains (one subtree per domain,
//! see [`crate::policy::DomainPolicy::name_constraint_bases`]), and every IP
//! address excluded. Clients (OpenSSL, Go, rustls, browsers) then reject any
//! certificate it signs for another name, even one minted with a stolen key.
//!
//! This module owns the constraints written into a new CA
//! ([`NameConstraintsSpec`]) and the ones read back from a CA certificate
//! ([`Constraints`]), which the leaf issuer checks before minting so that it
//! never mints a certificate clients would reject. It does no I/O.

use std::net::IpAddr;

use ipnet::IpNet;
use rcgen::{CidrSubnet, GeneralSubtree, NameConstraints};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;

/// The constraints to write into a new CA: the permitted DNS subtrees.
///
/// Every IP address is excluded as well (a server name here is a DNS name;
/// without the exclusion an IP SAN would be unconstrained, since RFC 5280
/// constrains only the name forms a CA lists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameConstraintsSpec {
    permitted_dns: Vec<String>,
}

impl NameConstraintsSpec {
    /// Permits `bases` (lowercase DNS names without wildcards; each permits
    /// itself and every name under it). Fails on an empty list, a name that
    /// is not a plain DNS name, or a top-level domain alone.
    pub fn new(bases: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut permitted: Vec<String> = Vec::new();
        for base in bases {
            let base = base.trim_end_matches('.').to_ascii_lowercase();
            if rustls_pki_types::DnsName::try_from(base.as_str()).is_err() || base.contains('*') {
                return Err(format!("{base:?} is not a DNS name"));
            }
            if !base.contains('.') {
                return Err(format!("{base:?} is a whole top-level domain; a name constraint must be narrower"));
            }
            permitted.push(base);
        }
        if permitted.is_empty() {
            return Err("no domain to permit".to_owned());
        }
        permitted.sort();
        permitted.dedup();
        // A base under another base adds nothing.
        let all = permitted.clone();
        permitted.retain(|b| !all.iter().any(|other| other != b && dns_within(b, other)));
        Ok(Self { permitted_dns: permitted })
    }

    /// The permitted DNS subtrees, sorted, none under another.
    pub fn permitted_dns(&self) -> &[String] {
        &self.permitted_dns
    }

    pub(super) fn to_rcgen(&self) -> NameConstraints {
        NameConstraints {
            permitted_subtrees: self.permitted_dns.iter().cloned().map(GeneralSubtree::DnsName).collect(),
            excluded_subtrees: vec![
                GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
                GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
            ],
        }
    }
}

/// Name constraints as read from a CA certificate, in the subset clients
/// apply to TLS server certificates: DNS names and IP addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints {
    permitted_dns: Vec<String>,
    excluded_dns: Vec<String>,
    permitted_ip: Vec<IpNet>,
    excluded_ip: Vec<IpNet>,
    /// Whether the certificate has the extension at all.
    present: bool,
}

impl Constraints {
    /// The constraints of `cert` (none when it has no such extension). An
    /// extension we cannot read is an error: better no CA than one whose
    /// leaves clients may reject.
    pub(super) fn from_cert(cert: &X509Certificate<'_>) -> Result<Self, x509_parser::error::X509Error> {
        let Some(ext) = cert.name_constraints()? else {
            return Ok(Self::default());
        };
        let mut out = Self { present: true, ..Self::default() };
        for (subtrees, dns, ip) in [
            (&ext.value.permitted_subtrees, &mut out.permitted_dns, &mut out.permitted_ip),
            (&ext.value.excluded_subtrees, &mut out.excluded_dns, &mut out.excluded_ip),
        ] {
            for subtree in subtrees.iter().flatten() {
                match &subtree.base {
                    GeneralName::DNSName(name) => dns.push(name.trim_end_matches('.').to_ascii_lowercase()),
                    GeneralName::IPAddress(bytes) => {
                        ip.push(ip_subtree(bytes).ok_or(x509_parser::error::X509Error::InvalidExtensions)?)
                    }
                    // Other forms (e-mail, URI, directory names) do not
                    // constrain TLS server names.
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Whether the certificate carries name constraints.
    pub fn is_constrained(&self) -> bool {
        self.present
    }

    /// The permitted DNS subtrees (empty: DNS names are not restricted).
    pub fn permitted_dns(&self) -> &[String] {
        &self.permitted_dns
    }

    /// Whether clients accept a leaf for the DNS name `name` (lowercase,
    /// without a trailing dot) under these constraints.
    pub fn permits_dns(&self, name: &str) -> bool {
        if self.excluded_dns.iter().any(|base| dns_within(name, base)) {
            return false;
        }
        // RFC 5280: a name form with no permitted subtree is not restricted.
        self.permitted_dns.is_empty() || self.permitted_dns.iter().any(|base| dns_within(name, base))
    }

    /// Whether clients accept a leaf for the IP address `ip`.
    pub fn permits_ip(&self, ip: IpAddr) -> bool {
        if self.excluded_ip.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        self.permitted_ip.is_empty() || self.permitted_ip.iter().any(|net| net.contains(&ip))
    }
}

/// Whether `name` is in the DNS subtree `base` (RFC 5280 4.2.1.10: the base
/// itself and every name made by adding labels on its left; a base with a
/// leading dot, as some CAs write it, means the subdomains only; an empty
/// base means every name).
pub fn dns_within(name: &str, base: &str) -> bool {
    if base.is_empty() {
        return true;
    }
    if let Some(sub) = base.strip_prefix('.') {
        return name.len() > sub.len() && name.ends_with(base);
    }
    name == base
        || (name.len() > base.len() && name.ends_with(base) && name.as_bytes()[name.len() - base.len() - 1] == b'.')
}

/// An iPAddress subtree: address then mask, 8 or 32 bytes.
fn ip_subtree(bytes: &[u8]) -> Option<IpNet> {
    let (addr, prefix) = match bytes.len() {
        8 => {
            let addr: [u8; 4] = bytes[..4].try_into().ok()?;
            (IpAddr::from(addr), prefix_len(&bytes[4..])?)
        }
        32 => {
            let addr: [u8; 16] = bytes[..16].try_into().ok()?;
            (IpAddr::from(addr), prefix_len(&bytes[16..])?)
        }
        _ => return None,
    };
    IpNet::new(addr, prefix).ok().map(|net| net.trunc())
}

/// The prefix length of a contiguous mask; `None` for a mask with holes.
fn prefix_len(mask: &[u8]) -> Option<u8> {
    let ones: u32 = mask.iter().map(|b| b.count_ones()).sum();
    let contiguous =
        mask.iter().flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1)).skip(ones as usize).all(|b| b == 0);
    contiguous.then_some(ones as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_subtrees_follow_rfc_5280() {
        assert!(dns_within("openai.com", "openai.com"));
        assert!(dns_within("api.openai.com", "openai.com"));
        assert!(dns_within("a.b.openai.com", "openai.com"));
        assert!(!dns_within("evilopenai.com", "openai.com"));
        assert!(!dns_within("openai.com.evil.com", "openai.com"));
        assert!(!dns_within("com", "openai.com"));
        assert!(dns_within("api.openai.com", ".openai.com"));
        assert!(!dns_within("openai.com", ".openai.com"));
        assert!(dns_within("anything.example", ""));
    }

    #[test]
    fn spec_drops_nested_bases_and_refuses_wide_ones() {
        let spec = NameConstraintsSpec::new(
            ["api.githubcopilot.com", "githubcopilot.com", "API.openai.com.", "api.openai.com"].map(String::from),
        )
        .unwrap();
        assert_eq!(spec.permitted_dns(), ["api.openai.com", "githubcopilot.com"]);
        assert!(NameConstraintsSpec::new(["ai".to_owned()]).unwrap_err().contains("top-level"));
        assert!(NameConstraintsSpec::new(["*.openai.com".to_owned()]).is_err());
        assert!(NameConstraintsSpec::new(Vec::new()).is_err());
    }

    #[test]
    fn permits_checks_excluded_then_permitted() {
        let c = Constraints {
            permitted_dns: vec!["openai.com".into()],
            excluded_dns: vec!["evil.openai.com".into()],
            permitted_ip: vec![],
            excluded_ip: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
            present: true,
        };
        assert!(c.permits_dns("api.openai.com"));
        assert!(!c.permits_dns("x.evil.openai.com"));
        assert!(!c.permits_dns("example.com"));
        assert!(!c.permits_ip("127.0.0.1".parse().unwrap()));
        assert!(!c.permits_ip("::1".parse().unwrap()));
        let none = Constraints::default();
        assert!(none.permits_dns("example.com") && none.permits_ip("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn ip_subtrees_parse_address_and_mask() {
        assert_eq!(ip_subtree(&[10, 0, 0, 0, 255, 0, 0, 0]), Some("10.0.0.0/8".parse().unwrap()));
        assert_eq!(ip_subtree(&[0; 8]), Some("0.0.0.0/0".parse().unwrap()));
        assert_eq!(ip_subtree(&[0; 32]), Some("::/0".parse().unwrap()));
        assert_eq!(ip_subtree(&[10, 0, 0, 0, 255, 0, 255, 0]), None, "mask with a hole");
        assert_eq!(ip_subtree(&[1, 2, 3]), None);
    }
}

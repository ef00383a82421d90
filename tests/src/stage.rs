//! A namespace with the fake provider at 198.18.0.10, the interceptor
//! redirecting a client cgroup, and what real clients need to trust it: the
//! stage for privileged end-to-end tests with TLS.

use std::time::Duration;

use anyhow::{Context, Result};
use interceptor::testing::{
    Cgroup, Interceptor, Netns,
    clients::{ClientEnv, HostsFile, ScratchDir},
    provider::{FakeProvider, TestPki},
};
use serde_json::Value;

const READY: Duration = Duration::from_secs(20);

/// A namespace with the fake provider, the interceptor redirecting the
/// client cgroup, and a CA bundle trusting both our CA and the provider's.
pub struct Stage {
    pub netns: Netns,
    _root: Cgroup,
    // Dropping a test cgroup kills its processes: keep the interceptor's.
    _proxy_cg: Cgroup,
    pub client_cg: Cgroup,
    pub provider: FakeProvider,
    pub proxy: Interceptor,
    pub hosts: HostsFile,
    pub bundle: std::path::PathBuf,
    pub scratch_path: std::path::PathBuf,
    _scratch: ScratchDir,
}

/// Starts the interceptor in `netns` and `proxy_cg` with `config`, the
/// redirect covering `attach` (eBPF) or the namespace (iptables), and waits
/// until it is ready.
pub fn start_interceptor(
    netns: &Netns,
    proxy_cg: &Cgroup,
    attach: &Cgroup,
    config: &str,
    redirect: &str,
) -> Result<Interceptor> {
    let attach = attach.path().to_str().context("utf-8 path")?.to_string();
    let mut args = vec!["--redirect", redirect];
    if redirect == "ebpf" {
        args.extend(["--cgroup", attach.as_str()]);
    }
    let mut proxy = Interceptor::start(netns, Some(proxy_cg), config, &args)?;
    proxy.wait_ready(netns, READY)?;
    Ok(proxy)
}

/// A CA bundle in `dir` trusting the interceptor's CA and the fake
/// provider's: what clients need to reach intercepted and passed-through
/// hosts alike.
pub fn trust_bundle(proxy: &Interceptor, pki: &TestPki, dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let ours = std::fs::read_to_string(proxy.state_dir().join("ca.crt"))?;
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, format!("{ours}{}", pki.ca_pem()))?;
    Ok(bundle)
}

impl Stage {
    /// `extra` is appended to the interceptor's configuration.
    pub fn new(name: &str, redirect: &str, extra: &str) -> Result<Self> {
        let netns = Netns::new(name)?;
        netns.add_addr("lo", "198.18.0.10/32")?;
        let root = Cgroup::new(name)?;
        let proxy_cg = root.child("proxy")?;
        let client_cg = root.child("client")?;
        let pki = TestPki::with_defaults()?;
        let scratch = ScratchDir::new(name)?;
        let upstream_ca = pki.write_ca(scratch.path())?;
        let provider = FakeProvider::start_in(&netns, "198.18.0.10:443".parse()?, &pki)?;
        let config = format!(
            "[targets]\ncidrs = [\"198.18.0.10\"]\nresolve_interval = \"1s\"\n[tls]\nupstream_ca = \"{}\"\n{extra}\n",
            upstream_ca.display()
        );
        let proxy = start_interceptor(&netns, &proxy_cg, &client_cg, &config, redirect)?;
        let bundle = trust_bundle(&proxy, &pki, scratch.path())?;
        let hosts = HostsFile::with_defaults()?;
        let scratch_path = scratch.path().to_path_buf();
        Ok(Self {
            scratch_path,
            netns,
            _root: root,
            _proxy_cg: proxy_cg,
            client_cg,
            provider,
            proxy,
            hosts,
            bundle,
            _scratch: scratch,
        })
    }

    pub fn env(&self) -> ClientEnv<'_> {
        ClientEnv::new(&self.bundle).in_netns(&self.netns).in_cgroup(&self.client_cg).with_hosts(&self.hosts)
    }

    /// The interceptor's record of the connection from `local_port`.
    pub fn record(&self, local_port: u16) -> Result<Value> {
        self.proxy.wait_connection(Duration::from_secs(5), |e| {
            e["client"].as_str().is_some_and(|c| c.ends_with(&format!(":{local_port}")))
        })
    }

    /// The interceptor's records for a process name.
    pub fn records_of(&self, comm: &str) -> Result<Value> {
        self.proxy.wait_connection(Duration::from_secs(5), |e| e["comm"] == comm)
    }
}

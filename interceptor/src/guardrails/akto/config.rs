//! The Akto backend's environment variables (`AKTO_URL`, `APP_NAME`,
//! `AKTO_API_TOKEN`, and the addon's `AKTO_GUARDRAILS_MODE`,
//! `AKTO_TEXT_THRESHOLD`, `AKTO_LOG_PAYLOADS`). Its settings
//! (`[guardrails.akto]`) and the addon's variables are typed and validated
//! in `config::akto`, below this module; they are re-exported here.

pub use crate::config::akto::{
    API_PATH, AddonEnv, AktoConfig, ENV_GUARDRAILS_MODE, ENV_LOG_PAYLOADS, ENV_TEXT_THRESHOLD,
};

/// Environment variables with the seed's meaning.
pub const ENV_URL: &str = "AKTO_URL";
pub const ENV_APP_NAME: &str = "APP_NAME";
pub const ENV_TOKEN: &str = "AKTO_API_TOKEN";

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::akto::endpoint_url;
    use crate::guardrails::akto::{AktoClient, AktoError};

    #[test]
    fn config_defaults_and_file_form() {
        let cfg: AktoConfig = toml::from_str(r#"url = "http://akto:9090""#).unwrap();
        assert_eq!(cfg.request_timeout, Duration::from_secs(15));
        assert_eq!(cfg.stream_timeout, Duration::from_secs(5));
        assert!(cfg.block_on_disallowed && cfg.ingest && !cfg.log_payloads);
        assert_eq!(cfg.account_id, "1000000");
        assert_eq!(cfg.vxlan_id, "test");
        assert_eq!(cfg.circuit_failures, 5);
        assert!(cfg.validate().is_empty());

        let cfg: AktoConfig = toml::from_str(
            "url = \"https://akto.example.com/\"\nrequest_timeout = \"2s\"\ncircuit_cooldown = \"1m\"\ntoken = \"t\"",
        )
        .unwrap();
        assert_eq!(cfg.request_timeout, Duration::from_secs(2));
        assert_eq!(cfg.circuit_cooldown, Duration::from_secs(60));
        assert!(toml::from_str::<AktoConfig>("bogus = 1").is_err());
        // The token never leaves in a serialized config.
        let out = toml::to_string(&cfg).unwrap();
        assert!(!out.contains("token"), "{out}");
    }

    #[test]
    fn token_is_never_printed() {
        let cfg = AktoConfig { url: "http://a".into(), token: Some("s3cr3t-token".into()), ..AktoConfig::default() };
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        let client = AktoClient::new(cfg).unwrap();
        let dbg = format!("{client:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
    }

    #[test]
    fn invalid_configs_report_every_problem() {
        let cfg = AktoConfig {
            url: "ftp://akto".into(),
            token: Some("bad\ntoken".into()),
            request_timeout: Duration::ZERO,
            ..AktoConfig::default()
        };
        let Err(AktoError::InvalidConfig { errors }) = AktoClient::new(cfg) else {
            panic!("must be invalid");
        };
        assert_eq!(errors.len(), 3, "{errors:?}");
        for url in ["", "not a url", "http://user:pw@akto", "http://akto?x=1"] {
            let cfg = AktoConfig { url: url.into(), ..AktoConfig::default() };
            assert!(AktoClient::new(cfg).is_err(), "{url}");
        }
    }

    #[test]
    fn endpoint_is_appended_once() {
        assert_eq!(endpoint_url("http://akto:9090").unwrap().as_str(), "http://akto:9090/api/http-proxy");
        assert_eq!(endpoint_url("https://a.example/base/").unwrap().as_str(), "https://a.example/base/api/http-proxy");
        assert_eq!(endpoint_url("http://akto/api/http-proxy").unwrap().as_str(), "http://akto/api/http-proxy");
    }
}

//! What every binary's `config.rs` parses the same way: collecting value errors so all are
//! reported at once, how to reach the controller, the bearer token (given or in a file), the log
//! format and the admin addresses. Owns the parsing only; each binary names its own flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::cert_manager::Token;
use crate::control::{self, ControlPlane};
use crate::telemetry::LogFormat;

/// Everything wrong with a command line, one line each.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

/// `parsed`, or `None` with the error recorded against `what` (the flag) and the `given` text.
pub fn value<T>(errors: &mut Vec<String>, what: &str, given: &str, parsed: Result<T, String>) -> Option<T> {
    match parsed {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(format!("{what} {given:?}: {e}"));
            None
        }
    }
}

/// How a proxy reaches the controller: Istio's ztunnel's variables for the xDS and CA addresses,
/// the roots their certificates must chain to, and the names expected in them.
#[derive(clap::Args, Debug)]
pub struct ControlArgs {
    /// The controller's xDS address: https://host:15012 (http:// only to a loopback address).
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: String,
    /// The CA address; the xDS address by default (the controller serves both on one port).
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// PEM roots the controller's xDS certificate must chain to (the istio-ca-root-cert ConfigMap).
    #[arg(long, env = "XDS_ROOT_CA", default_value = control::DEFAULT_ROOT_CERT)]
    pub xds_root_ca: PathBuf,
    /// PEM roots for the CA's certificate; the xDS roots by default.
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root_ca: Option<PathBuf>,
    /// The name the xDS certificate must carry when it is not the address's host (e.g. the
    /// address is a Service's IP): `weft-controller.weft-system.svc`.
    #[arg(long, env = "ALT_XDS_HOSTNAME")]
    pub alt_xds_hostname: Option<String>,
    /// The same for the CA; the xDS one by default.
    #[arg(long, env = "ALT_CA_HOSTNAME")]
    pub alt_ca_hostname: Option<String>,
}

impl ControlArgs {
    /// The xDS and CA channels, or `None` with every error recorded.
    pub fn parse(&self, errors: &mut Vec<String>) -> Option<(ControlPlane, ControlPlane)> {
        let xds = value(
            errors,
            "--xds-address/XDS_ADDRESS",
            &self.xds_address,
            ControlPlane::parse(&self.xds_address, &self.xds_root_ca, self.alt_xds_hostname.as_deref()),
        );
        let ca_address = self.ca_address.as_deref().unwrap_or(&self.xds_address);
        let ca_roots = self.ca_root_ca.as_deref().unwrap_or(&self.xds_root_ca);
        let ca_name = self.alt_ca_hostname.as_deref().or(self.alt_xds_hostname.as_deref());
        let ca = match &self.ca_address {
            None if self.ca_root_ca.is_none() && self.alt_ca_hostname.is_none() => xds.clone(),
            _ => value(
                errors,
                "--ca-address/CA_ADDRESS",
                ca_address,
                ControlPlane::parse(ca_address, ca_roots, ca_name),
            ),
        };
        Some((xds?, ca?))
    }
}

/// An `ip:port`.
pub fn socket_addr(given: &str) -> Result<SocketAddr, String> {
    given.parse::<SocketAddr>().map_err(|e| format!("{e} (ip:port)"))
}

/// `plain` or `json`.
pub fn log_format(given: &str) -> Result<LogFormat, String> {
    match given {
        "plain" => Ok(LogFormat::Plain),
        "json" => Ok(LogFormat::Json),
        _ => Err("is neither plain nor json".to_owned()),
    }
}

/// The token from `--token` or `--token-file` (at most one); `None` with the error recorded
/// when both are given.
pub fn token(errors: &mut Vec<String>, token: Option<String>, file: Option<PathBuf>) -> Option<Token> {
    match (token, file) {
        (Some(_), Some(_)) => {
            errors.push("--token/WEFT_TOKEN and --token-file/WEFT_TOKEN_FILE: give one, not both".into());
            None
        }
        (Some(t), None) => Some(Token::Static(t)),
        (None, Some(path)) => Some(Token::File(path)),
        (None, None) => Some(Token::None),
    }
}

/// Serializes a token for `/config_dump` without its secret.
pub fn token_kind<S: serde::Serializer>(token: &Token, serializer: S) -> Result<S::Ok, S::Error> {
    match token {
        Token::None => serializer.serialize_str("none"),
        Token::Static(_) => serializer.serialize_str("static (hidden)"),
        Token::File(path) => serializer.collect_str(&format_args!("file {}", path.display())),
    }
}

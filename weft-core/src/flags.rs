//! What every binary's `config.rs` parses the same way: collecting value errors so all are
//! reported at once, the controller's address, the bearer token (given or in a file), the log
//! format and the admin addresses. Owns the parsing only; each binary names its own flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::cert_manager::Token;
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

/// A controller address: `http://host:port` or `https://host:port`.
pub fn endpoint(given: &str) -> Result<String, String> {
    let rest = given
        .strip_prefix("http://")
        .or_else(|| given.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    if rest.is_empty() || !rest.contains(':') {
        return Err("must name a host and a port".into());
    }
    Ok(given.to_owned())
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

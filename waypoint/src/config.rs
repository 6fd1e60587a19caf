//! The waypoint's configuration: every flag and environment variable named once (the ones the
//! controller's waypoint Deployment sets, Istio's names where Istio has one), parsed into typed
//! values and checked together before anything is bound. The effective [`Config`] is served in
//! the admin `/config_dump`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Serialize;
use weft_core::admin::AdminAddresses;
use weft_core::cert_manager::Token;
use weft_core::control::ControlPlane;
use weft_core::flags::{log_format, socket_addr, token_kind, value, ControlArgs};
use weft_core::identity::Identity;
use weft_core::names::{DEFAULT_DOMAIN_SUFFIX, DEFAULT_TRUST_DOMAIN, HBONE_PORT};
use weft_core::telemetry::LogFormat;

pub use weft_core::flags::ConfigError;

/// The environment variables the waypoint reads (those its Deployment sets).
pub mod env {
    pub const WAYPOINT_NAME: &str = "WAYPOINT_NAME";
    pub const POD_NAME: &str = "POD_NAME";
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
    pub const INSTANCE_IP: &str = "INSTANCE_IP";
    pub const SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
    pub const NODE_NAME: &str = "NODE_NAME";
    pub const TRUST_DOMAIN: &str = "TRUST_DOMAIN";
    pub const TOKEN: &str = "WEFT_TOKEN";
    pub const TOKEN_FILE: &str = "WEFT_TOKEN_FILE";
    pub const WORKER_THREADS: &str = "WAYPOINT_WORKER_THREADS";
    pub const LOG_FORMAT: &str = "LOG_FORMAT";
    pub const ACCESS_LOG: &str = "WAYPOINT_ACCESS_LOG";
    /// Istio's name for how often JWKS are refetched (istiod's there; the waypoint's here).
    pub const JWKS_REFRESH: &str = "PILOT_JWT_PUB_KEY_REFRESH_INTERVAL";
}

/// How long the first bytes of a stream of undeclared protocol are waited for before it is
/// taken as TCP (a server-first protocol sends nothing until the server speaks).
pub const DEFAULT_SNIFF_TIMEOUT: Duration = Duration::from_millis(100);

/// The command line as typed; [`Config::parse`] turns it into a [`Config`].
#[derive(Parser, Debug)]
#[command(
    name = "waypoint",
    about = "Weft's waypoint: the L7 proxy of the services bound to an istio-waypoint Gateway"
)]
pub struct Args {
    /// The waypoint's Gateway (in the pod's namespace): the resource it subscribes to.
    #[arg(long, env = env::WAYPOINT_NAME)]
    name: String,
    #[arg(long, env = env::POD_NAMESPACE)]
    namespace: String,
    /// The pod's name, sent in the xDS node id (the Gateway's name when not given).
    #[arg(long, env = env::POD_NAME)]
    pod_name: Option<String>,
    /// The pod's IP, sent in the xDS node id.
    #[arg(long, env = env::INSTANCE_IP)]
    pod_ip: String,
    /// The service account the pod runs as (its identity); the Gateway's name by default, as
    /// Istio names a waypoint's service account.
    #[arg(long, env = env::SERVICE_ACCOUNT)]
    service_account: Option<String>,
    /// The Kubernetes node of the pod, sent in the xDS metadata.
    #[arg(long, env = env::NODE_NAME)]
    node_name: Option<String>,
    #[arg(long, env = env::TRUST_DOMAIN, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    #[command(flatten)]
    control: ControlArgs,
    /// The bearer token presented to the controller.
    #[arg(long, env = env::TOKEN, hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token, re-read on each use (a projected service-account token).
    #[arg(long, env = env::TOKEN_FILE)]
    token_file: Option<PathBuf>,
    /// Address the HBONE listener (15008) binds; `::` takes IPv4 too.
    #[arg(long, default_value = "::")]
    bind: String,
    #[arg(long, default_value_t = HBONE_PORT)]
    hbone_port: u16,
    /// Threads serving requests.
    #[arg(long, env = env::WORKER_THREADS, default_value = "2")]
    worker_threads: String,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_address: String,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_address: String,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_address: String,
    /// `plain` or `json`.
    #[arg(long, env = env::LOG_FORMAT, default_value = "plain")]
    log_format: String,
    /// Log one line per request (target `access`), as Envoy's access log.
    #[arg(long, env = env::ACCESS_LOG)]
    access_log: bool,
    /// How often each RequestAuthentication's `jwksUri` is fetched again (`20m`, `30s`, `500ms`).
    #[arg(long, env = env::JWKS_REFRESH, default_value = "20m")]
    jwks_refresh_interval: String,
}

/// The waypoint's effective configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// The Gateway `namespace/name` this waypoint is.
    pub name: String,
    pub namespace: String,
    pub pod_name: String,
    pub pod_ip: IpAddr,
    pub node_name: Option<String>,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    #[serde(serialize_with = "display")]
    pub identity: Identity,
    pub xds: ControlPlane,
    pub ca: ControlPlane,
    #[serde(serialize_with = "token_kind")]
    pub token: Token,
    pub hbone: SocketAddr,
    pub worker_threads: NonZeroUsize,
    pub admin: AdminAddresses,
    pub log_format: LogFormat,
    pub access_log: bool,
    /// How often JWKS are refetched.
    pub jwks_refresh: Duration,
    pub sniff_timeout: Duration,
}

impl Config {
    /// The configuration from the process's arguments and environment. Exits with clap's help
    /// on a usage error; returns every value error together.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::parse(Args::parse())
    }

    /// Parses and checks `args`, collecting every error.
    pub fn parse(args: Args) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        let e = &mut errors;
        let pod_ip = value(
            e,
            "--pod-ip/INSTANCE_IP",
            &args.pod_ip,
            args.pod_ip.parse::<IpAddr>().map_err(|e| e.to_string()),
        );
        let bind = value(e, "--bind", &args.bind, args.bind.parse::<IpAddr>().map_err(|e| e.to_string()));
        let worker_threads = value(
            e,
            "--worker-threads/WAYPOINT_WORKER_THREADS",
            &args.worker_threads,
            args.worker_threads.parse::<NonZeroUsize>().map_err(|e| format!("{e} (at least 1)")),
        );
        let admin = value(e, "--admin-address", &args.admin_address, socket_addr(&args.admin_address));
        let metrics =
            value(e, "--metrics-address", &args.metrics_address, socket_addr(&args.metrics_address));
        let readiness =
            value(e, "--readiness-address", &args.readiness_address, socket_addr(&args.readiness_address));
        let log_format = value(e, "--log-format/LOG_FORMAT", &args.log_format, log_format(&args.log_format));
        let jwks_refresh = value(
            e,
            "--jwks-refresh-interval/PILOT_JWT_PUB_KEY_REFRESH_INTERVAL",
            &args.jwks_refresh_interval,
            duration(&args.jwks_refresh_interval),
        );
        let control = args.control.parse(e);
        let service_account = args.service_account.clone().unwrap_or_else(|| args.name.clone());
        let identity = value(
            e,
            "--trust-domain, --namespace and --service-account",
            &format!("{}/{}/{}", args.trust_domain, args.namespace, service_account),
            Identity::new(&args.trust_domain, &args.namespace, &service_account).map_err(|e| e.to_string()),
        );
        if args.name.is_empty() {
            errors.push("--name/WAYPOINT_NAME is empty: name the waypoint's Gateway".into());
        }
        let token = weft_core::flags::token(&mut errors, args.token, args.token_file);
        match (
            pod_ip,
            bind,
            worker_threads,
            admin,
            metrics,
            readiness,
            log_format,
            control,
            identity,
            token,
            jwks_refresh,
        ) {
            (
                Some(pod_ip),
                Some(bind),
                Some(worker_threads),
                Some(admin),
                Some(metrics),
                Some(readiness),
                Some(log_format),
                Some((xds, ca)),
                Some(identity),
                Some(token),
                Some(jwks_refresh),
            ) if errors.is_empty() => Ok(Config {
                pod_name: args.pod_name.filter(|p| !p.is_empty()).unwrap_or_else(|| args.name.clone()),
                name: args.name,
                namespace: args.namespace,
                pod_ip,
                node_name: args.node_name.filter(|n| !n.is_empty()),
                identity,
                xds,
                ca,
                token,
                hbone: SocketAddr::new(bind, args.hbone_port),
                worker_threads,
                admin: AdminAddresses { admin, metrics, readiness },
                log_format,
                access_log: args.access_log,
                jwks_refresh,
                sniff_timeout: DEFAULT_SNIFF_TIMEOUT,
            }),
            _ => Err(ConfigError(errors)),
        }
    }

    /// The xDS node id, as Istio's waypoints send it:
    /// `waypoint~<pod ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
    pub fn node_id(&self) -> String {
        format!(
            "waypoint~{}~{}.{ns}~{ns}.svc.{DEFAULT_DOMAIN_SUFFIX}",
            self.pod_ip,
            self.pod_name,
            ns = self.namespace
        )
    }

    /// The name of the Waypoint resource this waypoint takes: `<namespace>/<name>`.
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn display<S: serde::Serializer>(value: &impl std::fmt::Display, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// A duration as Istio writes one: a number and a unit (`ms`, `s`, `m`, `h`), at least 1 ms.
fn duration(given: &str) -> Result<Duration, String> {
    let given = given.trim();
    let split = given.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(given.len());
    let (number, unit) = given.split_at(split);
    let number: f64 =
        number.parse().map_err(|_| format!("{given:?} is not a duration such as 20m or 30s"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("{given:?}: the unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| *d >= Duration::from_millis(1))
        .ok_or_else(|| format!("{given:?} is not a duration of at least 1ms"))
}
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        Config::parse(Args::try_parse_from(std::iter::once("waypoint").chain(args.iter().copied())).unwrap())
    }

    #[test]
    fn the_deployments_flags_make_the_waypoints_identity_and_node_id() {
        let config = parse(&[
            "--name=wp",
            "--namespace=shop",
            "--pod-name=wp-5d9",
            "--pod-ip=10.0.1.9",
            "--xds-address=http://127.0.0.1:15012",
            "--token-file=/var/run/secrets/tokens/istio-token",
        ])
        .unwrap();
        assert_eq!(config.identity.to_string(), "spiffe://cluster.local/ns/shop/sa/wp");
        assert_eq!(config.node_id(), "waypoint~10.0.1.9~wp-5d9.shop~shop.svc.cluster.local");
        assert_eq!(config.resource_name(), "shop/wp");
        assert_eq!(config.ca.url(), "http://127.0.0.1:15012");
        assert_eq!(config.hbone.port(), 15008);
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let err = parse(&[
            "--name=wp",
            "--namespace=Shop!",
            "--pod-ip=ten",
            "--xds-address=10.0.0.1:15012",
            "--log-format=xml",
            "--token=a",
            "--token-file=/t",
        ])
        .unwrap_err();
        let text = err.to_string();
        for wanted in ["INSTANCE_IP", "XDS_ADDRESS", "LOG_FORMAT", "--service-account", "give one, not both"]
        {
            assert!(text.contains(wanted), "{wanted} missing from:\n{text}");
        }
    }
}

//! The controller's flags and environment variables, each named once below, parsed into a typed
//! [`Config`] with every error reported together before any file is touched or port bound.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use weft_core::identity::IdentityError;
use weft_core::Identity;

use crate::ca::{
    SecretOptions, ServiceAccountRef, StaticAuthorizer, DEFAULT_MAX_CERT_LIFETIME, MAX_CERT_LIFETIME_CEILING,
};
use crate::tls::{ServingNames, DEFAULT_DNS_NAMES};
use crate::waypoints::WaypointOptions;

pub const FLAG_CA_DIR: &str = "ca-dir";
pub const ENV_CA_DIR: &str = "WEFT_CA_DIR";
pub const DEFAULT_CA_DIR: &str = "./var/ca";

pub const FLAG_CA_SECRET_NAMESPACE: &str = "ca-secret-namespace";
pub const ENV_CA_SECRET_NAMESPACE: &str = "POD_NAMESPACE";
/// Where a pod finds its own namespace (the default of --ca-secret-namespace in a cluster).
pub const SERVICE_ACCOUNT_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
pub const DEFAULT_CA_SECRET_NAMESPACE: &str = "weft-system";

pub const FLAG_TRUST_DOMAIN: &str = "trust-domain";
pub const ENV_TRUST_DOMAIN: &str = "WEFT_TRUST_DOMAIN";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

pub const FLAG_LISTEN: &str = "listen";
pub const ENV_LISTEN: &str = "WEFT_CA_LISTEN";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15010";

pub const FLAG_MAX_CERT_LIFETIME: &str = "max-cert-lifetime";
pub const ENV_MAX_CERT_LIFETIME: &str = "WEFT_MAX_CERT_LIFETIME";
pub const DEFAULT_MAX_CERT_LIFETIME_STR: &str = "90d";

pub const FLAG_NODE_TOKEN: &str = "node-token";
/// Comma-separated `NODE=TOKEN` pairs; prefer it to the flag, which other users see in `ps`.
pub const ENV_NODE_TOKENS: &str = "WEFT_NODE_TOKENS";

pub const FLAG_WAYPOINT_TOKENS_DIR: &str = "waypoint-tokens-dir";
pub const ENV_WAYPOINT_TOKENS_DIR: &str = "WEFT_WAYPOINT_TOKENS_DIR";

pub const FLAG_NODE_IDENTITY: &str = "node-identity";
/// Comma-separated `NODE=SPIFFE_ID` pairs.
pub const ENV_NODE_IDENTITIES: &str = "WEFT_NODE_IDENTITIES";

pub const FLAG_KUBERNETES: &str = "kubernetes";
pub const ENV_KUBERNETES: &str = "WEFT_KUBERNETES";
pub const FLAG_KUBECONFIG: &str = "kubeconfig";
pub const ENV_KUBECONFIG: &str = "KUBECONFIG";

pub const FLAG_ZTUNNEL_SERVICE_ACCOUNT: &str = "ztunnel-service-account";
pub const ENV_ZTUNNEL_SERVICE_ACCOUNT: &str = "WEFT_ZTUNNEL_SERVICE_ACCOUNT";
pub const DEFAULT_ZTUNNEL_SERVICE_ACCOUNT: &str = "weft-system/ztunnel";

pub const FLAG_WAYPOINT_IMAGE: &str = "waypoint-image";
pub const ENV_WAYPOINT_IMAGE: &str = "WEFT_WAYPOINT_IMAGE";
pub const DEFAULT_WAYPOINT_IMAGE: &str = "weft/waypoint:latest";

pub const FLAG_WAYPOINT_CONTROLLER_ADDRESS: &str = "waypoint-controller-address";
pub const ENV_WAYPOINT_CONTROLLER_ADDRESS: &str = "WEFT_WAYPOINT_CONTROLLER_ADDRESS";
pub const DEFAULT_WAYPOINT_CONTROLLER_ADDRESS: &str = "https://weft-controller.weft-system.svc:15012";

pub const FLAG_WAYPOINT_CONTROLLER_SERVER_NAME: &str = "waypoint-controller-server-name";
pub const ENV_WAYPOINT_CONTROLLER_SERVER_NAME: &str = "WEFT_WAYPOINT_CONTROLLER_SERVER_NAME";

pub const FLAG_PLAINTEXT: &str = "plaintext";
pub const ENV_PLAINTEXT: &str = "WEFT_PLAINTEXT";
pub const FLAG_TLS_DNS_NAME: &str = "tls-dns-name";
pub const ENV_TLS_DNS_NAMES: &str = "WEFT_TLS_DNS_NAMES";
pub const FLAG_TLS_IP: &str = "tls-ip";
pub const ENV_TLS_IPS: &str = "WEFT_TLS_IPS";

pub const FLAG_CONFIG_DIR: &str = "config-dir";
pub const ENV_CONFIG_DIR: &str = "WEFT_CONFIG_DIR";

/// The command line as given; [`Config::from_args`] turns it into a [`Config`].
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "controller",
    about = "Weft's control plane: the CA that signs workload certificates and, given a config \
             directory, the xDS server of Istio's workload API."
)]
pub struct Args {
    /// Without Kubernetes: the directory holding root-cert.pem and root-key.pem (created with a new
    /// root on first start) [default: ./var/ca].
    #[arg(long = FLAG_CA_DIR, env = ENV_CA_DIR, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// With Kubernetes: the namespace of the CA's Secrets, istiod's `cacerts` (a plug-in
    /// intermediate, used when present) or else `istio-ca-secret` (self-signed, created on first
    /// start) [default: the pod's namespace, else weft-system].
    #[arg(long = FLAG_CA_SECRET_NAMESPACE, env = ENV_CA_SECRET_NAMESPACE, value_name = "NAMESPACE")]
    pub ca_secret_namespace: Option<String>,
    /// The SPIFFE trust domain this CA signs identities for.
    #[arg(long = FLAG_TRUST_DOMAIN, env = ENV_TRUST_DOMAIN, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Address the CA's gRPC service (and, with --config-dir, the xDS server) listens on.
    #[arg(long = FLAG_LISTEN, env = ENV_LISTEN, default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Longest certificate lifetime a caller may ask for: a number with a unit s, m, h or d.
    #[arg(long = FLAG_MAX_CERT_LIFETIME, env = ENV_MAX_CERT_LIFETIME, default_value = DEFAULT_MAX_CERT_LIFETIME_STR)]
    pub max_cert_lifetime: String,
    /// A bearer token that authenticates a node, as NODE=TOKEN; repeatable.
    #[arg(
        long = FLAG_NODE_TOKEN,
        env = ENV_NODE_TOKENS,
        value_name = "NODE=TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub node_tokens: Vec<String>,
    /// With --config-dir: a directory of waypoint tokens, read while the mesh runs. The file
    /// DIR/<namespace>/<name> holds the bearer token of the waypoint <namespace>/<name> (the
    /// Gateway of that name; surrounding whitespace ignored); a waypoint presenting it may obtain
    /// only the identity spiffe://<trust-domain>/ns/<namespace>/sa/<name> and subscribe to xDS
    /// only as that waypoint. Files added, changed or removed take effect at the next request
    /// without a restart. On Kubernetes, waypoints are known by TokenReview instead.
    #[arg(long = FLAG_WAYPOINT_TOKENS_DIR, env = ENV_WAYPOINT_TOKENS_DIR, value_name = "DIR")]
    pub waypoint_tokens_dir: Option<PathBuf>,
    /// An identity a node may hold (a pod with that service account runs there), as
    /// NODE=SPIFFE_ID; repeatable.
    #[arg(long = FLAG_NODE_IDENTITY, env = ENV_NODE_IDENTITIES, value_name = "NODE=SPIFFE_ID", value_delimiter = ',')]
    pub node_identities: Vec<String>,
    /// A directory of Kubernetes/Istio YAML to watch. When given, the controller also serves xDS
    /// (Istio's workload API) on the same port, and a node may hold the identities of the pods
    /// the directory places on it (the --node-identity table is then not used).
    #[arg(long = FLAG_CONFIG_DIR, env = ENV_CONFIG_DIR, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Watch the Kubernetes API (in-cluster credentials, or --kubeconfig) instead of a directory;
    /// like --config-dir, the controller then also serves xDS.
    #[arg(long = FLAG_KUBERNETES, env = ENV_KUBERNETES)]
    pub kubernetes: bool,
    /// The kubeconfig to reach the API server with (implies --kubernetes).
    #[arg(long = FLAG_KUBECONFIG, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// With Kubernetes and no --node-token, the CA accepts only tokens of this service account
    /// (NAMESPACE/NAME), checked by TokenReview and bound to a pod whose node is the caller's.
    #[arg(
        long = FLAG_ZTUNNEL_SERVICE_ACCOUNT,
        env = ENV_ZTUNNEL_SERVICE_ACCOUNT,
        value_name = "NAMESPACE/NAME",
        default_value = DEFAULT_ZTUNNEL_SERVICE_ACCOUNT
    )]
    pub ztunnel_service_account: String,
    /// The image of the waypoint Deployments made for `istio-waypoint` Gateways (Kubernetes only).
    #[arg(long = FLAG_WAYPOINT_IMAGE, env = ENV_WAYPOINT_IMAGE, default_value = DEFAULT_WAYPOINT_IMAGE)]
    pub waypoint_image: String,
    /// Where waypoints reach the controller's xDS and CA, a URL (http:// or https://, host and
    /// port), passed to them as --xds-address and --ca-address (Kubernetes only).
    #[arg(
        long = FLAG_WAYPOINT_CONTROLLER_ADDRESS,
        env = ENV_WAYPOINT_CONTROLLER_ADDRESS,
        value_name = "URL",
        default_value = DEFAULT_WAYPOINT_CONTROLLER_ADDRESS
    )]
    pub waypoint_controller_address: String,
    /// The name the waypoints expect in the controller's certificate when the address's host is
    /// not it (an IP, as without cluster DNS): passed to them as ALT_XDS_HOSTNAME.
    #[arg(long = FLAG_WAYPOINT_CONTROLLER_SERVER_NAME, env = ENV_WAYPOINT_CONTROLLER_SERVER_NAME, value_name = "NAME")]
    pub waypoint_controller_server_name: Option<String>,
    /// Serve gRPC without TLS. Local only: refused unless --listen is a loopback address.
    #[arg(long = FLAG_PLAINTEXT, env = ENV_PLAINTEXT)]
    pub plaintext: bool,
    /// A DNS name of the TLS serving certificate (the names proxies dial); repeatable. By
    /// default weft-controller.weft-system.svc and istiod.istio-system.svc (Istio's ztunnel's
    /// default address).
    #[arg(long = FLAG_TLS_DNS_NAME, env = ENV_TLS_DNS_NAMES, value_name = "NAME", value_delimiter = ',')]
    pub tls_dns_names: Vec<String>,
    /// An IP address of the TLS serving certificate; repeatable.
    #[arg(long = FLAG_TLS_IP, env = ENV_TLS_IPS, value_name = "IP", value_delimiter = ',')]
    pub tls_ips: Vec<String>,
}

/// Where the Kubernetes source finds its API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KubeAccess {
    /// In-cluster service-account credentials, else $KUBECONFIG or ~/.kube/config.
    Default,
    /// This kubeconfig file.
    File(PathBuf),
}

/// The controller's effective configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// Without `kubernetes`: where the root is kept.
    pub ca_dir: PathBuf,
    /// With `kubernetes`: where the CA's Secrets are (instead of `ca_dir`).
    pub ca_secret: SecretOptions,
    pub trust_domain: String,
    pub listen: SocketAddr,
    pub max_cert_lifetime: Duration,
    /// Token -> node. Never printed.
    pub node_tokens: BTreeMap<String, String>,
    /// Node -> identities its pods run as.
    pub node_identities: BTreeMap<String, BTreeSet<Identity>>,
    /// Where the waypoints' token files are (`<dir>/<namespace>/<name>`), read on demand.
    pub waypoint_tokens_dir: Option<PathBuf>,
    /// The watched YAML directory; `None` (and no `kubernetes`): CA only, identities from
    /// `node_identities`.
    pub config_dir: Option<PathBuf>,
    /// Watch the Kubernetes API instead (never together with `config_dir`).
    pub kubernetes: Option<KubeAccess>,
    /// With `kubernetes` and no `node_tokens`: whose TokenReview-checked tokens the CA accepts.
    pub ztunnel_service_account: ServiceAccountRef,
    /// How waypoints are deployed for `istio-waypoint` Gateways (with `kubernetes` only).
    pub waypoints: WaypointOptions,
    /// The names of the TLS serving certificate; `None`: plaintext (loopback only).
    pub tls: Option<ServingNames>,
}

/// One thing wrong with the command line or environment.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--{FLAG_TRUST_DOMAIN} {value:?} is not a SPIFFE trust domain: {reason}")]
    TrustDomain { value: String, reason: String },
    #[error("--{FLAG_LISTEN} {value:?} is not an address like 127.0.0.1:15010: {reason}")]
    Listen { value: String, reason: String },
    #[error("--{FLAG_MAX_CERT_LIFETIME} {value:?} is invalid: {reason}")]
    MaxCertLifetime { value: String, reason: String },
    #[error("--{flag} {value:?} must be of the form {form}")]
    Pair { flag: &'static str, value: String, form: &'static str },
    #[error("--{FLAG_NODE_TOKEN}: a token is given for both node {first:?} and node {second:?}")]
    TokenReused { first: String, second: String },
    #[error("--{FLAG_NODE_IDENTITY} for node {node:?}: {reason}")]
    Identity { node: String, reason: String },
    #[error("--{FLAG_NODE_IDENTITY} for node {node:?}: {identity} is not in trust domain {trust_domain:?}")]
    ForeignIdentity { node: String, identity: Identity, trust_domain: String },
    #[error("node {node:?} has identities but no --{FLAG_NODE_TOKEN}, so it can never ask for them")]
    NodeWithoutToken { node: String },
    #[error("--{FLAG_CONFIG_DIR} and --{FLAG_KUBERNETES} are two sources; give one")]
    TwoSources,
    #[error(
        "--{FLAG_CA_DIR} is for running without Kubernetes; with --{FLAG_KUBERNETES} the CA is kept \
         in the Secret cacerts or istio-ca-secret of --{FLAG_CA_SECRET_NAMESPACE}"
    )]
    CaDirOnKubernetes,
    #[error("--{FLAG_CA_SECRET_NAMESPACE} {value:?} is not a namespace name (a DNS label)")]
    CaSecretNamespace { value: String },
    #[error("--{FLAG_ZTUNNEL_SERVICE_ACCOUNT} {value:?}: {reason}")]
    ServiceAccount { value: String, reason: String },
    #[error("--{flag} must not be empty")]
    Empty { flag: &'static str },
    #[error(
        "--{FLAG_WAYPOINT_CONTROLLER_ADDRESS} {value:?} must be a URL with a host and a port, e.g. \
         http://weft-controller.weft-system.svc:15012 (the waypoint, like ztunnel, wants the scheme)"
    )]
    ControllerAddress { value: String },
    #[error("--{FLAG_PLAINTEXT} serves only on loopback, but --{FLAG_LISTEN} is {listen}: drop --{FLAG_PLAINTEXT} (proxies reach the controller over TLS)")]
    PlaintextNotLocal { listen: SocketAddr },
    #[error("--{FLAG_PLAINTEXT} and --{flag}: a plaintext port has no certificate")]
    PlaintextWithTls { flag: &'static str },
    #[error("--{FLAG_TLS_DNS_NAME} {value:?} is not a DNS name")]
    TlsDnsName { value: String },
    #[error("--{FLAG_TLS_IP} {value:?} is not an IP address")]
    TlsIp { value: String },
}

/// Everything wrong with the command line, reported together.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl Config {
    /// Parses and checks everything in `args`, collecting every error.
    pub fn from_args(args: Args) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();

        // Weft has no trust-domain type: check it as part of an identity and keep the reason.
        let trust_domain_ok = match Identity::new(&args.trust_domain, "ns", "sa") {
            Ok(_) => true,
            Err(e) => {
                let reason = match e {
                    IdentityError::Part { why, .. } => why.to_owned(),
                    other => other.to_string(),
                };
                errors.push(ConfigError::TrustDomain { value: args.trust_domain.clone(), reason });
                false
            }
        };
        let listen = args
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| {
                errors.push(ConfigError::Listen { value: args.listen.clone(), reason: e.to_string() })
            })
            .ok();
        let max_cert_lifetime = parse_lifetime(&args.max_cert_lifetime)
            .map_err(|reason| {
                errors.push(ConfigError::MaxCertLifetime { value: args.max_cert_lifetime.clone(), reason })
            })
            .ok();

        let mut node_tokens: BTreeMap<String, String> = BTreeMap::new();
        for pair in &args.node_tokens {
            let Some((node, token)) = split_pair(pair) else {
                errors.push(ConfigError::Pair {
                    flag: FLAG_NODE_TOKEN,
                    value: redact(pair),
                    form: "NODE=TOKEN (both non-empty)",
                });
                continue;
            };
            match node_tokens.get(token) {
                Some(first) if first != node => {
                    errors.push(ConfigError::TokenReused { first: first.clone(), second: node.to_owned() })
                }
                _ => {
                    node_tokens.insert(token.to_owned(), node.to_owned());
                }
            }
        }

        let mut node_identities: BTreeMap<String, BTreeSet<Identity>> = BTreeMap::new();
        for pair in &args.node_identities {
            let Some((node, identity)) = split_pair(pair) else {
                errors.push(ConfigError::Pair {
                    flag: FLAG_NODE_IDENTITY,
                    value: pair.clone(),
                    form: "NODE=spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
                });
                continue;
            };
            match identity.parse::<Identity>() {
                Err(e) => errors.push(ConfigError::Identity { node: node.to_owned(), reason: e.to_string() }),
                Ok(identity) if trust_domain_ok && identity.trust_domain() != args.trust_domain => errors
                    .push(ConfigError::ForeignIdentity {
                        node: node.to_owned(),
                        identity,
                        trust_domain: args.trust_domain.clone(),
                    }),
                Ok(identity) => {
                    node_identities.entry(node.to_owned()).or_default().insert(identity);
                }
            }
        }
        let nodes_with_tokens: BTreeSet<&String> = node_tokens.values().collect();
        for node in node_identities.keys() {
            if !nodes_with_tokens.contains(node) {
                errors.push(ConfigError::NodeWithoutToken { node: node.clone() });
            }
        }

        let kubernetes = match (args.kubeconfig, args.kubernetes) {
            (Some(file), _) => Some(KubeAccess::File(file)),
            (None, true) => Some(KubeAccess::Default),
            (None, false) => None,
        };
        if kubernetes.is_some() && args.config_dir.is_some() {
            errors.push(ConfigError::TwoSources);
        }
        if kubernetes.is_some() && args.ca_dir.is_some() {
            errors.push(ConfigError::CaDirOnKubernetes);
        }
        let ca_secret_namespace = match args.ca_secret_namespace {
            Some(value) => value.trim().to_owned(),
            None if kubernetes.is_some() => std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE_FILE)
                .map(|ns| ns.trim().to_owned())
                .unwrap_or_else(|_| DEFAULT_CA_SECRET_NAMESPACE.to_owned()),
            None => DEFAULT_CA_SECRET_NAMESPACE.to_owned(),
        };
        let is_label = |s: &str| {
            (1..=63).contains(&s.len())
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if !is_label(&ca_secret_namespace) {
            errors.push(ConfigError::CaSecretNamespace { value: ca_secret_namespace.clone() });
        }
        let ca_secret = SecretOptions {
            namespace: ca_secret_namespace,
            overlap: max_cert_lifetime.unwrap_or(DEFAULT_MAX_CERT_LIFETIME),
            ..SecretOptions::default()
        };
        let ztunnel_service_account = args
            .ztunnel_service_account
            .parse::<ServiceAccountRef>()
            .map_err(|reason| {
                errors
                    .push(ConfigError::ServiceAccount { value: args.ztunnel_service_account.clone(), reason })
            })
            .ok();
        for (flag, value) in [
            (FLAG_WAYPOINT_IMAGE, &args.waypoint_image),
            (FLAG_WAYPOINT_CONTROLLER_ADDRESS, &args.waypoint_controller_address),
        ] {
            if value.trim().is_empty() {
                errors.push(ConfigError::Empty { flag });
            }
        }
        let controller_address = args.waypoint_controller_address.trim();
        let has_scheme = controller_address
            .strip_prefix("http://")
            .or_else(|| controller_address.strip_prefix("https://"))
            .is_some_and(|rest| rest.contains(':') && !rest.starts_with(':'));
        if !controller_address.is_empty() && !has_scheme {
            errors.push(ConfigError::ControllerAddress { value: controller_address.to_owned() });
        }
        let waypoints = WaypointOptions {
            image: args.waypoint_image.trim().to_owned(),
            controller_address: args.waypoint_controller_address.trim().to_owned(),
            controller_server_name: args
                .waypoint_controller_server_name
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty()),
            ..WaypointOptions::default()
        };
        let tls = serving_names(&args.tls_dns_names, &args.tls_ips, &mut errors);
        let tls = match (args.plaintext, listen) {
            (false, _) => Some(tls),
            (true, _) if !args.tls_dns_names.is_empty() => {
                errors.push(ConfigError::PlaintextWithTls { flag: FLAG_TLS_DNS_NAME });
                None
            }
            (true, _) if !args.tls_ips.is_empty() => {
                errors.push(ConfigError::PlaintextWithTls { flag: FLAG_TLS_IP });
                None
            }
            (true, Some(listen)) if !listen.ip().is_loopback() => {
                errors.push(ConfigError::PlaintextNotLocal { listen });
                None
            }
            (true, _) => None,
        };

        match (listen, max_cert_lifetime, ztunnel_service_account) {
            (Some(listen), Some(max_cert_lifetime), Some(ztunnel_service_account)) if errors.is_empty() => {
                Ok(Config {
                    ca_dir: args.ca_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_CA_DIR)),
                    ca_secret,
                    trust_domain: args.trust_domain,
                    listen,
                    max_cert_lifetime,
                    node_tokens,
                    node_identities,
                    waypoint_tokens_dir: args.waypoint_tokens_dir,
                    config_dir: args.config_dir,
                    kubernetes,
                    ztunnel_service_account,
                    waypoints,
                    tls,
                })
            }
            _ => Err(ConfigErrors(errors)),
        }
    }

    /// The static authorizer the node tables describe.
    pub fn authorizer(&self) -> StaticAuthorizer {
        let mut authorizer = StaticAuthorizer::new();
        for (token, node) in &self.node_tokens {
            authorizer = authorizer.with_token(token, node.clone());
        }
        for (node, identities) in &self.node_identities {
            for identity in identities {
                authorizer = authorizer.with_identity(node.clone(), identity.clone());
            }
        }
        authorizer
    }
}

/// What the command line gives without flags, except plaintext (on loopback): what tests running
/// the controller in-process start from.
impl Default for Config {
    fn default() -> Self {
        Config {
            ca_dir: PathBuf::from(DEFAULT_CA_DIR),
            ca_secret: SecretOptions::default(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 15010)),
            max_cert_lifetime: DEFAULT_MAX_CERT_LIFETIME,
            node_tokens: BTreeMap::new(),
            node_identities: BTreeMap::new(),
            waypoint_tokens_dir: None,
            config_dir: None,
            kubernetes: None,
            ztunnel_service_account: ServiceAccountRef {
                namespace: "weft-system".to_owned(),
                name: "ztunnel".to_owned(),
            },
            waypoints: WaypointOptions::default(),
            tls: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes_with_tokens: BTreeMap<&str, usize> =
            self.node_tokens.values().fold(BTreeMap::new(), |mut m, node| {
                *m.entry(node.as_str()).or_default() += 1;
                m
            });
        f.debug_struct("Config")
            .field("ca_dir", &self.ca_dir)
            // Not "ca_secret": the test below checks that no token ("secret...") is shown.
            .field("kubernetes_ca", &self.ca_secret)
            .field("trust_domain", &self.trust_domain)
            .field("listen", &self.listen)
            .field("max_cert_lifetime", &self.max_cert_lifetime)
            .field("node_tokens (count per node)", &nodes_with_tokens)
            .field("node_identities", &self.node_identities)
            .field("waypoint_tokens_dir", &self.waypoint_tokens_dir)
            .field("config_dir", &self.config_dir)
            .field("kubernetes", &self.kubernetes)
            .field("ztunnel_service_account", &self.ztunnel_service_account)
            .field("waypoints", &self.waypoints)
            .field("tls", &self.tls)
            .finish()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration:")?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The serving certificate's names: those given, else [`DEFAULT_DNS_NAMES`]; bad ones recorded.
fn serving_names(dns: &[String], ips: &[String], errors: &mut Vec<ConfigError>) -> ServingNames {
    let mut names = ServingNames { dns: Vec::new(), ips: Vec::new() };
    for name in dns.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        match rustls_pki_types::DnsName::try_from(name) {
            Ok(_) => names.dns.push(name.to_owned()),
            Err(_) => errors.push(ConfigError::TlsDnsName { value: name.to_owned() }),
        }
    }
    for ip in ips.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
        match ip.parse() {
            Ok(ip) => names.ips.push(ip),
            Err(_) => errors.push(ConfigError::TlsIp { value: ip.to_owned() }),
        }
    }
    if names.dns.is_empty() && dns.iter().all(|n| n.trim().is_empty()) {
        names.dns = DEFAULT_DNS_NAMES.iter().map(|n| (*n).to_owned()).collect();
    }
    names
}

/// `NODE=VALUE` with both sides non-empty.
fn split_pair(pair: &str) -> Option<(&str, &str)> {
    let (node, value) = pair.split_once('=')?;
    let (node, value) = (node.trim(), value.trim());
    (!node.is_empty() && !value.is_empty()).then_some((node, value))
}

/// A `NODE=TOKEN` value fit for an error message: the token is not shown.
fn redact(pair: &str) -> String {
    match pair.split_once('=') {
        Some((node, _)) => format!("{node}=<redacted>"),
        None => "<redacted>".to_owned(),
    }
}

/// A lifetime as `<number><unit>`, unit one of s, m, h, d; between 1s and
/// [`MAX_CERT_LIFETIME_CEILING`].
fn parse_lifetime(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 =
        number.parse().map_err(|_| "expected a number followed by s, m, h or d, e.g. 90d".to_owned())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => 24 * 60 * 60,
        _ => return Err(format!("unknown unit {unit:?}: use s, m, h or d, e.g. 90d")),
    };
    let secs = number.checked_mul(unit_secs).ok_or_else(|| "it is far too long".to_owned())?;
    let lifetime = Duration::from_secs(secs);
    if lifetime.is_zero() {
        return Err("it must be at least 1s".to_owned());
    }
    if lifetime > MAX_CERT_LIFETIME_CEILING {
        return Err(format!(
            "it must be at most {}d (the root's lifetime)",
            MAX_CERT_LIFETIME_CEILING.as_secs() / 86400
        ));
    }
    Ok(lifetime)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigErrors> {
        let argv = std::iter::once("controller").chain(args.iter().copied());
        Config::from_args(Args::try_parse_from(argv).unwrap())
    }

    #[test]
    fn defaults() {
        let config = parse(&[]).unwrap();
        // The command line serves TLS; `Config::default()` (in-process tests) plaintext on loopback.
        let names = ServingNames { dns: DEFAULT_DNS_NAMES.map(str::to_owned).to_vec(), ips: Vec::new() };
        assert_eq!(config, Config { tls: Some(names), ..Config::default() });
        assert_eq!(config.max_cert_lifetime, Duration::from_secs(90 * 24 * 3600));
    }

    #[test]
    fn fills_the_node_tables() {
        let config = parse(&[
            "--node-token=node-a=secret-a",
            "--node-token",
            "node-b=secret-b",
            "--node-identity=node-a=spiffe://cluster.local/ns/default/sa/web",
            "--node-identity=node-a=spiffe://cluster.local/ns/default/sa/db",
            "--listen=0.0.0.0:0",
            "--max-cert-lifetime=12h",
        ])
        .unwrap();
        assert_eq!(config.node_tokens.get("secret-a").map(String::as_str), Some("node-a"));
        assert_eq!(config.node_tokens.get("secret-b").map(String::as_str), Some("node-b"));
        assert_eq!(config.node_identities["node-a"].len(), 2);
        assert_eq!(config.listen, "0.0.0.0:0".parse().unwrap());
        assert_eq!(config.max_cert_lifetime, Duration::from_secs(12 * 3600));
        assert_eq!(config.config_dir, None);
        assert_eq!(parse(&["--config-dir=/etc/weft"]).unwrap().config_dir, Some(PathBuf::from("/etc/weft")));
        assert_eq!(
            parse(&["--waypoint-tokens-dir=/run/weft/waypoint-tokens"]).unwrap().waypoint_tokens_dir,
            Some(PathBuf::from("/run/weft/waypoint-tokens"))
        );
        assert_eq!(parse(&["--kubernetes"]).unwrap().kubernetes, Some(KubeAccess::Default));
        assert_eq!(
            parse(&["--kubeconfig=/k"]).unwrap().kubernetes,
            Some(KubeAccess::File(PathBuf::from("/k")))
        );
        assert_eq!(parse(&["--kubernetes", "--config-dir=/d"]).unwrap_err().0, vec![ConfigError::TwoSources]);
        assert_eq!(
            parse(&["--kubernetes", "--ca-dir=/d"]).unwrap_err().0,
            vec![ConfigError::CaDirOnKubernetes]
        );
        assert_eq!(parse(&["--ca-dir=/d"]).unwrap().ca_dir, PathBuf::from("/d"));
        let in_ns =
            parse(&["--kubernetes", "--ca-secret-namespace=istio-system", "--max-cert-lifetime=2d"]).unwrap();
        assert_eq!(in_ns.ca_secret.namespace, "istio-system");
        assert_eq!(in_ns.ca_secret.overlap, Duration::from_secs(2 * 86400), "old roots outlive their leaves");
        assert_eq!(
            parse(&["--ca-secret-namespace=Istio_System"]).unwrap_err().0,
            vec![ConfigError::CaSecretNamespace { value: "Istio_System".into() }]
        );
        let kube = parse(&[
            "--kubernetes",
            "--ztunnel-service-account=istio-system/ztunnel",
            "--waypoint-image=registry.example/waypoint:1",
            "--waypoint-controller-address=https://weft.example:15012",
        ])
        .unwrap();
        assert_eq!(kube.ztunnel_service_account.username(), "system:serviceaccount:istio-system:ztunnel");
        assert_eq!(kube.waypoints.image, "registry.example/waypoint:1");
        assert_eq!(kube.waypoints.controller_address, "https://weft.example:15012");
        let shown = format!("{config:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn reports_every_error_together() {
        let errors = parse(&[
            "--trust-domain=Bad Domain",
            "--listen=localhost",
            "--max-cert-lifetime=90 days",
            "--node-token=no-equals-secret",
            "--node-token=node-a=shared",
            "--node-token=node-b=shared",
            "--node-identity=node-a=not-spiffe",
            "--node-identity=node-c",
            "--node-identity=node-z=spiffe://other.org/ns/a/sa/b",
            "--ztunnel-service-account=ztunnel",
            "--waypoint-image=",
            "--waypoint-controller-address=weft.example:15012",
        ])
        .unwrap_err();
        // The bad trust domain hides the foreign-identity error it would cause; check that one alone.
        let foreign =
            parse(&["--node-token=node-z=t", "--node-identity=node-z=spiffe://other.org/ns/a/sa/b"])
                .unwrap_err()
                .to_string();
        assert!(foreign.contains("not in trust domain \"cluster.local\""), "{foreign}");
        let msg = errors.to_string();
        let want = [
            "--trust-domain \"Bad Domain\" is not a SPIFFE trust domain: only lowercase letters",
            "--listen \"localhost\"",
            "--max-cert-lifetime \"90 days\"",
            "--node-token \"<redacted>\"",
            "both node \"node-a\" and node \"node-b\"",
            "for node \"node-a\"",
            "--node-identity \"node-c\"",
            "node \"node-z\" has identities but no --node-token",
            "--ztunnel-service-account \"ztunnel\": expected NAMESPACE/NAME",
            "--waypoint-image must not be empty",
            "--waypoint-controller-address \"weft.example:15012\" must be a URL",
        ];
        for w in want {
            assert!(msg.contains(w), "missing {w:?} in:\n{msg}");
        }
        assert_eq!(errors.0.len(), want.len(), "{msg}");
        assert!(!msg.contains("secret") && !msg.contains("shared"), "tokens leak:\n{msg}");
    }

    #[test]
    fn identities_without_a_token_are_an_error() {
        let errors = parse(&["--node-identity=node-a=spiffe://cluster.local/ns/a/sa/b"]).unwrap_err();
        assert_eq!(errors.0, vec![ConfigError::NodeWithoutToken { node: "node-a".into() }]);
    }

    #[test]
    fn lifetime_table() {
        let cases: &[(&str, Result<u64, &str>)] = &[
            ("1s", Ok(1)),
            ("90m", Ok(90 * 60)),
            ("24h", Ok(24 * 3600)),
            ("90d", Ok(90 * 86400)),
            ("3650d", Ok(3650 * 86400)),
            ("3651d", Err("at most 3650d")),
            ("0s", Err("at least 1s")),
            ("90", Err("unknown unit")),
            ("d", Err("expected a number")),
            ("-1h", Err("expected a number")),
            ("1.5h", Err("unknown unit")),
            ("99999999999999999999d", Err("expected a number")),
            ("9999999999999999d", Err("far too long")),
        ];
        for (input, want) in cases {
            let got = parse_lifetime(input);
            match (want, &got) {
                (Ok(secs), Ok(d)) => assert_eq!(d.as_secs(), *secs, "{input}"),
                (Err(fragment), Err(msg)) => assert!(msg.contains(fragment), "{input}: {msg}"),
                _ => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }
}

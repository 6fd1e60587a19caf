//! The conversion of `weft.waypoint.v1.Waypoint` into [`Waypoint`](super::Waypoint), with
//! every problem of the resource collected (see the parent module's docs for the rules). Owns
//! nothing but the conversion; the types and their invariants are the parent's.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};
use std::str::FromStr;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::StatusCode;

use weft_core::identity::Identity;
use weft_core::proto::weft::waypoint::v1 as wp;

use super::*;

impl TryFrom<&wp::Waypoint> for Waypoint {
    type Error = ResourceError;

    fn try_from(proto: &wp::Waypoint) -> Result<Waypoint, ResourceError> {
        let mut problems = Problems::default();
        let here = format!("waypoint {}/{}", proto.namespace, proto.name);
        let identity =
            Identity::from_str(&proto.identity).map_err(|e| problems.add(&here, "identity", e)).ok();
        let mut services = BTreeMap::new();
        for svc in &proto.services {
            let Some(converted) = service(svc, &mut problems) else { continue };
            if services.contains_key(&converted.hostname) {
                let at = format!("service {}", svc.hostname);
                problems.add(&at, "hostname", "the waypoint lists this service twice");
                continue;
            }
            services.insert(converted.hostname.clone(), converted);
        }
        let security = security(&proto.policies, &proto.request_authentications, &here, &mut problems);
        match identity {
            Some(identity) if problems.list.is_empty() => Ok(Waypoint {
                name: proto.name.clone(),
                namespace: proto.namespace.clone(),
                identity,
                services,
                security,
            }),
            _ => Err(ResourceError {
                waypoint: format!("{}/{}", proto.namespace, proto.name),
                problems: problems.list,
            }),
        }
    }
}

impl TryFrom<wp::Waypoint> for Waypoint {
    type Error = ResourceError;

    fn try_from(proto: wp::Waypoint) -> Result<Waypoint, ResourceError> {
        Waypoint::try_from(&proto)
    }
}

/// The problems found so far in one resource.
#[derive(Default)]
struct Problems {
    list: Vec<Problem>,
}

impl Problems {
    fn add(&mut self, at: &str, field: impl Into<String>, reason: impl fmt::Display) {
        self.list.push(Problem { at: at.to_owned(), field: field.into(), reason: reason.to_string() });
    }

    /// `Some(value)` for `Ok`; records the problem and gives `None` for `Err`.
    fn check<T, E: fmt::Display>(&mut self, at: &str, field: &str, result: Result<T, E>) -> Option<T> {
        result.map_err(|e| self.add(at, field, e)).ok()
    }
}

fn service(proto: &wp::Service, problems: &mut Problems) -> Option<Service> {
    let at = format!("service {}", proto.hostname);
    let before = problems.list.len();
    if proto.hostname.is_empty() {
        problems.add(&at, "hostname", "empty");
    }
    let mut ports = BTreeSet::new();
    for (i, port) in proto.ports.iter().enumerate() {
        if let Some(port) = problems.check(&at, &format!("ports[{i}]"), port_number(*port)) {
            ports.insert(port);
        }
    }
    let mut protocols = BTreeMap::new();
    for (port, protocol) in &proto.protocols {
        let field = format!("protocols[{port}]");
        let Some(port) = problems.check(&at, &field, port_number(*port)) else { continue };
        match wp::PortProtocol::try_from(*protocol) {
            Ok(wp::PortProtocol::Http) => {
                protocols.insert(port, PortProtocol::Http);
            }
            Ok(wp::PortProtocol::Http2) => {
                protocols.insert(port, PortProtocol::Http2);
            }
            Ok(wp::PortProtocol::Tcp) => {
                protocols.insert(port, PortProtocol::Tcp);
            }
            // Unspecified (or a value from a newer controller): detected, as undeclared.
            Ok(wp::PortProtocol::Unspecified) | Err(_) => {}
        }
    }
    // Routes are named by their place in their own VirtualService (several may be joined).
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    let mut routes = Vec::with_capacity(proto.http_routes.len());
    for route in &proto.http_routes {
        let i = index.entry(route.virtual_service.as_str()).or_default();
        let route_at = format!(
            "VirtualService {} http[{i}]{} for service {}",
            route.virtual_service,
            if route.name.is_empty() { String::new() } else { format!(" ({:?})", route.name) },
            proto.hostname
        );
        *i += 1;
        if let Some(route) = http_route(route, &route_at, problems) {
            routes.push(route);
        }
    }
    let dr_at = format!("DestinationRule {} for service {}", proto.destination_rule, proto.hostname);
    let service_policy = match &proto.traffic_policy {
        Some(p) => traffic_policy(p, &dr_at, "trafficPolicy", problems),
        None => TrafficPolicy::default(),
    };
    let mut subsets = BTreeMap::new();
    for (i, s) in proto.subsets.iter().enumerate() {
        let field = format!("subsets[{i}]");
        if s.name.is_empty() {
            problems.add(&dr_at, format!("{field}.name"), "empty");
        } else if subsets.contains_key(&s.name) {
            problems.add(&dr_at, format!("{field}.name"), format!("subset {:?} is defined twice", s.name));
        }
        let policy = match &s.traffic_policy {
            Some(p) => traffic_policy(p, &dr_at, &format!("{field}.trafficPolicy"), problems),
            None => TrafficPolicy::default(),
        };
        let subset = Subset { name: s.name.clone(), labels: s.labels.clone(), traffic_policy: policy };
        subsets.entry(s.name.clone()).or_insert(subset);
    }
    let security = security(&proto.policies, &proto.request_authentications, &at, problems);
    (problems.list.len() == before).then(|| Service {
        hostname: proto.hostname.clone(),
        name: proto.name.clone(),
        namespace: proto.namespace.clone(),
        ports,
        protocols,
        routes,
        traffic_policy: service_policy,
        subsets,
        virtual_services: proto.virtual_services.clone(),
        destination_rule: (!proto.destination_rule.is_empty()).then(|| proto.destination_rule.clone()),
        security,
    })
}

/// The policies and request authentications of the waypoint or of one service; each that does
/// not convert is a problem naming it.
fn security(
    policies: &[wp::AuthorizationPolicy],
    request_authentications: &[wp::RequestAuthentication],
    at: &str,
    problems: &mut Problems,
) -> Security {
    let mut out = Security::default();
    for (i, p) in policies.iter().enumerate() {
        let field = format!("policies[{i}] (AuthorizationPolicy {}/{})", p.namespace, p.name);
        if let Some(policy) = problems.check(at, &field, Policy::try_from(p)) {
            out.policies.push(policy);
        }
    }
    for (i, r) in request_authentications.iter().enumerate() {
        let field = format!("requestAuthentications[{i}]");
        if let Some(ra) = problems.check(at, &field, RequestAuthentication::try_from(r)) {
            out.request_authentications.push(ra);
        }
    }
    out
}

fn http_route(proto: &wp::HttpRoute, at: &str, problems: &mut Problems) -> Option<HttpRoute> {
    let before = problems.list.len();
    let matches: Vec<HttpMatch> = proto
        .matches
        .iter()
        .enumerate()
        .filter_map(|(i, m)| http_match(m, at, &format!("match[{i}]"), problems))
        .collect();
    let headers = proto.headers.as_ref().map(|h| headers(h, at, "headers", problems)).unwrap_or_default();
    let action = action(proto, at, problems);
    let timeout = optional_duration(proto.timeout.as_ref(), at, "timeout", problems);
    let retries = match &proto.retries {
        None => Retries::Default,
        Some(r) => retries(r, at, problems),
    };
    let fault = proto.fault.as_ref().map(|f| fault(f, at, problems)).unwrap_or_default();
    let mirrors = proto
        .mirrors
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let field = format!("mirrors[{i}]");
            let destination = m.destination.as_ref();
            let destination = match destination {
                Some(d) => destination_of(d, at, &format!("{field}.destination"), problems),
                None => {
                    problems.add(at, format!("{field}.destination"), "missing");
                    None
                }
            };
            let percentage =
                problems.check(at, &format!("{field}.percentage"), Percent::try_from(m.percentage));
            Some(Mirror { destination: destination?, percentage: percentage? })
        })
        .collect();
    let action = action?;
    (problems.list.len() == before).then(|| HttpRoute {
        name: proto.name.clone(),
        virtual_service: proto.virtual_service.clone(),
        matches,
        action,
        timeout,
        retries,
        fault,
        mirrors,
        headers,
    })
}

/// Exactly one of destinations, redirect and direct response; a rewrite only with destinations.
fn action(proto: &wp::HttpRoute, at: &str, problems: &mut Problems) -> Option<Action> {
    let kinds = [!proto.destinations.is_empty(), proto.redirect.is_some(), proto.direct_response.is_some()];
    match kinds.iter().filter(|k| **k).count() {
        0 => {
            problems.add(at, "route", "the route has no destination, redirect or directResponse");
            return None;
        }
        1 => {}
        _ => {
            problems.add(at, "route", "only one of route, redirect and directResponse may be set");
            return None;
        }
    }
    if let Some(r) = &proto.redirect {
        if proto.rewrite.is_some() {
            problems.add(at, "rewrite", "a redirect route cannot rewrite (set the redirect's uri instead)");
        }
        return redirect(r, at, problems).map(Action::Redirect);
    }
    if let Some(d) = &proto.direct_response {
        if proto.rewrite.is_some() {
            problems.add(at, "rewrite", "a directResponse route cannot rewrite");
        }
        let status = problems.check(at, "directResponse.status", status_in(d.status, 200..=599));
        return Some(Action::DirectResponse(DirectResponse { status: status?, body: d.body.clone() }));
    }
    let mut entries = Vec::with_capacity(proto.destinations.len());
    let mut total: u64 = 0;
    for (i, d) in proto.destinations.iter().enumerate() {
        let field = format!("route[{i}]");
        let destination = match &d.destination {
            Some(dest) => destination_of(dest, at, &format!("{field}.destination"), problems),
            None => {
                problems.add(at, format!("{field}.destination"), "missing");
                None
            }
        };
        let headers = d
            .headers
            .as_ref()
            .map(|h| headers(h, at, &format!("{field}.headers"), problems))
            .unwrap_or_default();
        total += u64::from(d.weight);
        if let Some(destination) = destination {
            entries.push(WeightedDestination { destination, weight: d.weight, headers });
        }
    }
    let Some(total) = NonZeroU64::new(total) else {
        problems.add(at, "route[].weight", "the weights add up to 0, so no destination can be picked");
        return None;
    };
    let rewrite = proto.rewrite.as_ref().map(|r| rewrite(r, at, problems)).unwrap_or_default();
    (entries.len() == proto.destinations.len())
        .then_some(Action::Forward { destinations: WeightedDestinations { entries, total }, rewrite })
}

fn http_match(proto: &wp::HttpMatch, at: &str, field: &str, problems: &mut Problems) -> Option<HttpMatch> {
    let before = problems.list.len();
    let mut one = |name: &str, m: &Option<wp::StringMatch>| {
        m.as_ref().and_then(|m| string_match(m, at, &format!("{field}.{name}"), problems))
    };
    let uri = one("uri", &proto.uri);
    let scheme = one("scheme", &proto.scheme);
    let method = one("method", &proto.method);
    let authority = one("authority", &proto.authority);
    let mut header_matches = |name: &str, map: &BTreeMap<String, wp::StringMatch>| -> Vec<HeaderMatch> {
        map.iter()
            .filter_map(|(header, m)| {
                let field = format!("{field}.{name}[{header}]");
                let key = problems.check(at, &field, header_key(header));
                let value = value_match(m, at, &field, problems);
                Some(HeaderMatch { key: key?, value: value? })
            })
            .collect()
    };
    let headers = header_matches("headers", &proto.headers);
    let without_headers = header_matches("withoutHeaders", &proto.without_headers);
    let query_params = proto
        .query_params
        .iter()
        .filter_map(|(name, m)| {
            let value = value_match(m, at, &format!("{field}.queryParams[{name}]"), problems)?;
            Some(QueryMatch { name: name.clone(), value })
        })
        .collect();
    let port = match proto.port {
        0 => None,
        p => problems.check(at, &format!("{field}.port"), port_number(p)),
    };
    (problems.list.len() == before).then(|| HttpMatch {
        name: proto.name.clone(),
        uri,
        ignore_uri_case: proto.ignore_uri_case,
        scheme,
        method,
        authority,
        headers,
        without_headers,
        query_params,
        port,
        source_namespace: (!proto.source_namespace.is_empty()).then(|| proto.source_namespace.clone()),
        source_labels: proto.source_labels.clone(),
    })
}

/// A `uri`, `scheme`, `method` or `authority` match; one without a type is no condition.
fn string_match(
    proto: &wp::StringMatch,
    at: &str,
    field: &str,
    problems: &mut Problems,
) -> Option<StringMatch> {
    use wp::string_match::MatchType;
    match proto.match_type.as_ref()? {
        MatchType::Exact(s) => Some(StringMatch::Exact(s.clone())),
        MatchType::Prefix(s) => Some(StringMatch::Prefix(s.clone())),
        MatchType::Regex(r) => {
            problems.check(at, &format!("{field}.regex"), Pattern::new(r)).map(StringMatch::Regex)
        }
    }
}

/// A header or query parameter match, with Istio's forms of "present" (see the module docs).
fn value_match(
    proto: &wp::StringMatch,
    at: &str,
    field: &str,
    problems: &mut Problems,
) -> Option<ValueMatch> {
    use wp::string_match::MatchType;
    match &proto.match_type {
        None => Some(ValueMatch::Present),
        Some(MatchType::Prefix(p)) if p.is_empty() => Some(ValueMatch::Present),
        Some(MatchType::Regex(r)) if r == "*" || r == ".*" => Some(ValueMatch::Present),
        Some(_) => string_match(proto, at, field, problems).map(ValueMatch::Value),
    }
}

fn header_key(name: &str) -> Result<HeaderKey, String> {
    match name.to_ascii_lowercase().as_str() {
        ":authority" | "host" => Ok(HeaderKey::Authority),
        ":method" => Ok(HeaderKey::Method),
        ":path" => Ok(HeaderKey::Path),
        ":scheme" => Ok(HeaderKey::Scheme),
        other if other.starts_with(':') => Err(format!("{name:?} is not a pseudo-header a request has")),
        _ => HeaderName::from_bytes(name.as_bytes())
            .map(HeaderKey::Name)
            .map_err(|_| format!("{name:?} is not a valid header name")),
    }
}

fn destination_of(
    proto: &wp::Destination,
    at: &str,
    field: &str,
    problems: &mut Problems,
) -> Option<Destination> {
    let before = problems.list.len();
    if proto.host.is_empty() {
        problems.add(at, format!("{field}.host"), "empty");
    }
    let port = match proto.port {
        0 => None,
        p => problems.check(at, &format!("{field}.port"), port_number(p)),
    };
    (problems.list.len() == before).then(|| Destination {
        host: proto.host.clone(),
        subset: (!proto.subset.is_empty()).then(|| proto.subset.clone()),
        port,
    })
}

fn headers(proto: &wp::Headers, at: &str, field: &str, problems: &mut Problems) -> Headers {
    let mut authority = None;
    let request = proto
        .request
        .as_ref()
        .map(|ops| header_ops(ops, at, &format!("{field}.request"), Some(&mut authority), problems))
        .unwrap_or_default();
    let response = proto
        .response
        .as_ref()
        .map(|ops| header_ops(ops, at, &format!("{field}.response"), None, problems))
        .unwrap_or_default();
    Headers { request, response, authority }
}

/// One direction's operations. `authority` receives a request's `host`/`:authority`; elsewhere
/// those names are refused like every other pseudo-header.
fn header_ops(
    proto: &wp::HeaderOperations,
    at: &str,
    field: &str,
    mut authority: Option<&mut Option<String>>,
    problems: &mut Problems,
) -> HeaderOps {
    let mut ops = HeaderOps::default();
    let is_authority =
        |name: &str| name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case(":authority");
    for (kind, map) in [("set", &proto.set), ("add", &proto.add)] {
        for (name, value) in map {
            let field = format!("{field}.{kind}[{name}]");
            if is_authority(name) {
                if let Some(authority) = authority.as_deref_mut() {
                    *authority = problems.check(at, &field, authority_value(value));
                    continue;
                }
            }
            let name = problems.check(at, &field, changeable_header(name));
            let value = problems.check(
                at,
                &field,
                HeaderValue::from_str(value).map_err(|_| format!("{value:?} is not a valid header value")),
            );
            let (Some(name), Some(value)) = (name, value) else { continue };
            match kind {
                "set" => ops.set.push((name, value)),
                _ => ops.add.push((name, value)),
            }
        }
    }
    for (i, name) in proto.remove.iter().enumerate() {
        if let Some(name) = problems.check(at, &format!("{field}.remove[{i}]"), changeable_header(name)) {
            ops.remove.push(name);
        }
    }
    ops
}

/// A header name a route may set, add or remove: not a pseudo-header, not `host`.
fn changeable_header(name: &str) -> Result<HeaderName, String> {
    if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
        return Err(format!(
            "{name:?} cannot be changed this way (an authority is rewritten by a request set of `host`)"
        ));
    }
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a valid header name"))
}

/// An authority to send: a valid `host[:port]`.
fn authority_value(value: &str) -> Result<String, String> {
    match http::uri::Authority::from_str(value) {
        Ok(a) if !value.is_empty() && a.as_str() == value && !value.contains('@') => Ok(value.to_owned()),
        _ => Err(format!("{value:?} is not a valid authority (host[:port])")),
    }
}

fn rewrite(proto: &wp::Rewrite, at: &str, problems: &mut Problems) -> Rewrite {
    let uri = match (proto.uri.is_empty(), proto.uri_regex.is_empty()) {
        (true, true) => {
            if !proto.uri_regex_replacement.is_empty() {
                problems.add(at, "rewrite.uriRegexRewrite.match", "a rewrite without a regex to match");
            }
            None
        }
        (false, true) => problems.check(
            at,
            "rewrite.uri",
            path_chars(&proto.uri).map(|()| UriRewrite::Prefix(proto.uri.clone())),
        ),
        (true, false) => problems.check(
            at,
            "rewrite.uriRegexRewrite",
            RegexRewrite::new(&proto.uri_regex, &proto.uri_regex_replacement).map(UriRewrite::Regex),
        ),
        (false, false) => {
            problems.add(at, "rewrite", "only one of uri and uriRegexRewrite may be set");
            None
        }
    };
    let authority = match proto.authority.as_str() {
        "" => None,
        a => problems.check(at, "rewrite.authority", authority_value(a)),
    };
    Rewrite { uri, authority }
}

fn redirect(proto: &wp::Redirect, at: &str, problems: &mut Problems) -> Option<Redirect> {
    let before = problems.list.len();
    let status = match proto.redirect_code {
        0 | 301 => Some(StatusCode::MOVED_PERMANENTLY),
        c @ (302 | 303 | 307 | 308) => u16::try_from(c).ok().and_then(|c| StatusCode::from_u16(c).ok()),
        c => {
            problems.add(at, "redirect.redirectCode", format!("{c} is not one of 301, 302, 303, 307, 308"));
            None
        }
    };
    let uri = match proto.uri.as_str() {
        "" => None,
        u => problems.check(at, "redirect.uri", path_chars(u).map(|()| u.to_owned())),
    };
    let authority = match proto.authority.as_str() {
        "" => None,
        a => problems.check(at, "redirect.authority", authority_value(a)),
    };
    let port = match proto.port {
        0 => None,
        p => problems.check(at, "redirect.port", port_number(p)),
    };
    let scheme = match proto.scheme.as_str() {
        "" => None,
        s if http::uri::Scheme::from_str(s).is_ok() => Some(s.to_ascii_lowercase()),
        s => {
            problems.add(at, "redirect.scheme", format!("{s:?} is not a URI scheme"));
            None
        }
    };
    let status = status?;
    (problems.list.len() == before).then_some(Redirect { uri, authority, port, scheme, status })
}

fn retries(proto: &wp::Retries, at: &str, problems: &mut Problems) -> Retries {
    let Some(attempts) = NonZeroU32::new(proto.attempts) else {
        return Retries::Disabled;
    };
    let mut retry_on = Vec::new();
    let mut codes = Vec::new();
    for (i, condition) in proto.retry_on.iter().enumerate() {
        let condition = condition.trim();
        if let Some(on) = RetryOn::parse(condition) {
            retry_on.push(on);
        } else if let Ok(code) = status_in(condition.parse().unwrap_or(0), 100..=599) {
            codes.push(code);
        } else {
            problems.add(
                at,
                format!("retries.retryOn[{i}]"),
                format!("{condition:?} is not a retry condition or status code"),
            );
        }
    }
    if retry_on.is_empty() && codes.is_empty() {
        // Attempts without conditions: Istio's default conditions.
        retry_on = DEFAULT_RETRY_ON.to_vec();
        codes.push(StatusCode::SERVICE_UNAVAILABLE);
    } else if !codes.is_empty() && !retry_on.contains(&RetryOn::RetriableStatusCodes) {
        // Istio adds the condition that makes listed status codes count.
        retry_on.push(RetryOn::RetriableStatusCodes);
    }
    Retries::Policy(RetryPolicy {
        attempts,
        per_try_timeout: optional_duration(
            proto.per_try_timeout.as_ref(),
            at,
            "retries.perTryTimeout",
            problems,
        ),
        retry_on,
        retriable_status_codes: codes,
        backoff: optional_duration(proto.backoff.as_ref(), at, "retries.backoff", problems),
    })
}

fn fault(proto: &wp::Fault, at: &str, problems: &mut Problems) -> Fault {
    let delay = proto.delay.as_ref().and_then(|d| {
        if d.fixed_delay.is_none() {
            problems.add(at, "fault.delay.fixedDelay", "a delay needs a fixedDelay");
        }
        // A zero delay is a delay of nothing.
        let fixed = optional_duration(d.fixed_delay.as_ref(), at, "fault.delay.fixedDelay", problems);
        let percentage = problems.check(at, "fault.delay.percentage", Percent::try_from(d.percentage));
        Some(Delay { fixed: fixed.unwrap_or_default(), percentage: percentage? })
    });
    let abort = proto.abort.as_ref().and_then(|a| {
        let status = if a.grpc_status.is_empty() {
            problems.check(
                at,
                "fault.abort.httpStatus",
                status_in(a.http_status, 200..=599).map(AbortStatus::Http),
            )
        } else {
            problems.check(at, "fault.abort.grpcStatus", grpc_status(&a.grpc_status).map(AbortStatus::Grpc))
        };
        let percentage = problems.check(at, "fault.abort.percentage", Percent::try_from(a.percentage));
        Some(Abort { status: status?, percentage: percentage? })
    });
    Fault { delay, abort }
}

fn traffic_policy(
    proto: &wp::TrafficPolicy,
    at: &str,
    field: &str,
    problems: &mut Problems,
) -> TrafficPolicy {
    let defaults = port_policy(proto, at, field, problems);
    let mut port_level = BTreeMap::new();
    for (port, policy) in &proto.port_level {
        let field = format!("{field}.portLevelSettings[{port}]");
        if !policy.port_level.is_empty() {
            problems.add(at, &field, "port-level settings cannot nest");
        }
        let settings = port_policy(policy, at, &field, problems);
        if let Some(port) = problems.check(at, &format!("{field}.port"), port_number(*port)) {
            port_level.insert(port, settings);
        }
    }
    TrafficPolicy { defaults, port_level }
}

fn port_policy(proto: &wp::TrafficPolicy, at: &str, field: &str, problems: &mut Problems) -> PortPolicy {
    PortPolicy {
        load_balancer: proto.load_balancer.as_ref().and_then(|lb| load_balancer(lb, at, field, problems)),
        connection_pool: proto.connection_pool.as_ref().map(|c| connection_pool(c, at, field, problems)),
        outlier_detection: proto
            .outlier_detection
            .as_ref()
            .map(|o| outlier_detection(o, at, field, problems)),
    }
}

fn load_balancer(
    proto: &wp::LoadBalancer,
    at: &str,
    field: &str,
    problems: &mut Problems,
) -> Option<LoadBalancer> {
    use wp::load_balancer::Simple;
    let field = format!("{field}.loadBalancer");
    let mut keys = Vec::new();
    if !proto.hash_header.is_empty() {
        let name = HeaderName::from_bytes(proto.hash_header.as_bytes())
            .map_err(|_| format!("{:?} is not a valid header name", proto.hash_header));
        keys.push(
            problems.check(at, &format!("{field}.consistentHash.httpHeaderName"), name).map(HashKey::Header),
        );
    }
    if !proto.hash_cookie.is_empty() {
        keys.push(Some(HashKey::Cookie(proto.hash_cookie.clone())));
    }
    if proto.hash_source_ip {
        keys.push(Some(HashKey::SourceIp));
    }
    if !proto.hash_query_parameter.is_empty() {
        keys.push(Some(HashKey::QueryParameter(proto.hash_query_parameter.clone())));
    }
    let simple = match Simple::try_from(proto.simple) {
        Ok(Simple::Unspecified) => None,
        Ok(Simple::LeastRequest) => Some(LoadBalancer::LeastRequest),
        Ok(Simple::RoundRobin) => Some(LoadBalancer::RoundRobin),
        Ok(Simple::Random) => Some(LoadBalancer::Random),
        Ok(Simple::Passthrough) => Some(LoadBalancer::Passthrough),
        Err(_) => {
            problems.add(
                at,
                format!("{field}.simple"),
                format!("{} is not a known load balancer", proto.simple),
            );
            return None;
        }
    };
    match (simple, keys.len()) {
        (simple, 0) => Some(simple.unwrap_or_default()),
        (None, 1) => keys.pop().flatten().map(LoadBalancer::ConsistentHash),
        (Some(_), _) => {
            problems.add(at, field, "only one of simple and consistentHash may be set");
            None
        }
        (None, _) => {
            problems.add(at, format!("{field}.consistentHash"), "only one hash key may be set");
            None
        }
    }
}

fn connection_pool(
    proto: &wp::ConnectionPool,
    at: &str,
    field: &str,
    problems: &mut Problems,
) -> ConnectionPool {
    let field = format!("{field}.connectionPool");
    ConnectionPool {
        max_connections: NonZeroU32::new(proto.max_connections),
        connect_timeout: optional_duration(
            proto.connect_timeout.as_ref(),
            at,
            &format!("{field}.tcp.connectTimeout"),
            problems,
        ),
        http1_max_pending_requests: NonZeroU32::new(proto.http1_max_pending_requests),
        http2_max_requests: NonZeroU32::new(proto.http2_max_requests),
        max_requests_per_connection: NonZeroU32::new(proto.max_requests_per_connection),
        max_retries: NonZeroU32::new(proto.max_retries),
        idle_timeout: optional_duration(
            proto.idle_timeout.as_ref(),
            at,
            &format!("{field}.http.idleTimeout"),
            problems,
        ),
        max_concurrent_streams: NonZeroU32::new(proto.max_concurrent_streams),
        tcp_keepalive: proto.tcp_keepalive.as_ref().map(|k| TcpKeepalive {
            probes: NonZeroU32::new(k.probes),
            time: optional_duration(k.time.as_ref(), at, &format!("{field}.tcp.tcpKeepalive.time"), problems),
            interval: optional_duration(
                k.interval.as_ref(),
                at,
                &format!("{field}.tcp.tcpKeepalive.interval"),
                problems,
            ),
        }),
        max_connection_duration: optional_duration(
            proto.max_connection_duration.as_ref(),
            at,
            &format!("{field}.tcp.maxConnectionDuration"),
            problems,
        ),
        tcp_idle_timeout: optional_duration(
            proto.tcp_idle_timeout.as_ref(),
            at,
            &format!("{field}.tcp.idleTimeout"),
            problems,
        ),
        h2_upgrade_policy: match wp::H2UpgradePolicy::try_from(proto.h2_upgrade_policy) {
            Ok(wp::H2UpgradePolicy::H2UpgradeUpgrade) => H2Upgrade::Upgrade,
            Ok(wp::H2UpgradePolicy::H2UpgradeDoNotUpgrade) => H2Upgrade::DoNotUpgrade,
            Ok(wp::H2UpgradePolicy::H2UpgradeDefault) | Err(_) => H2Upgrade::Default,
        },
        use_client_protocol: proto.use_client_protocol,
    }
}

/// A gRPC status code by its name (`UNAVAILABLE`) or number (`14`), 1 to 16 (0 is OK, not an
/// abort).
fn grpc_status(name: &str) -> Result<u32, String> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    let code = match name.trim().parse::<u32>() {
        Ok(code) => code,
        Err(_) => NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name.trim()))
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| format!("{name:?} is not a gRPC status name or code"))?,
    };
    if (1..=16).contains(&code) {
        Ok(code)
    } else {
        Err(format!("{name:?} is not a gRPC error status (1 to 16)"))
    }
}

fn outlier_detection(
    proto: &wp::OutlierDetection,
    at: &str,
    field: &str,
    problems: &mut Problems,
) -> OutlierDetection {
    let field = format!("{field}.outlierDetection");
    let percent = |name: &str, value: u32, problems: &mut Problems| {
        if value > 100 {
            problems.add(at, format!("{field}.{name}"), format!("{value} is not a percentage from 0 to 100"));
        }
        value.min(100)
    };
    OutlierDetection {
        consecutive_5xx_errors: proto.consecutive_5xx_errors,
        consecutive_gateway_errors: proto.consecutive_gateway_errors,
        interval: optional_duration(proto.interval.as_ref(), at, &format!("{field}.interval"), problems),
        base_ejection_time: optional_duration(
            proto.base_ejection_time.as_ref(),
            at,
            &format!("{field}.baseEjectionTime"),
            problems,
        ),
        max_ejection_percent: percent("maxEjectionPercent", proto.max_ejection_percent, problems),
        min_health_percent: percent("minHealthPercent", proto.min_health_percent, problems),
        consecutive_local_origin_failures: proto.consecutive_local_origin_failures,
        split_external_local_origin_errors: proto.split_external_local_origin_errors,
    }
}

/// A protobuf duration; absent or zero is `None` (unset).
fn optional_duration(
    proto: Option<&prost_types::Duration>,
    at: &str,
    field: &str,
    problems: &mut Problems,
) -> Option<Duration> {
    let d = proto?;
    let seconds = u64::try_from(d.seconds);
    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000);
    match (seconds, nanos) {
        (Ok(s), Some(n)) => Some(Duration::new(s, n)).filter(|d| !d.is_zero()),
        _ => {
            problems.add(at, field, format!("{}s {}ns is not a valid duration", d.seconds, d.nanos));
            None
        }
    }
}

fn port_number(port: u32) -> Result<u16, String> {
    u16::try_from(port).ok().filter(|p| *p != 0).ok_or_else(|| format!("{port} is not a port (1-65535)"))
}

fn status_in(code: u32, range: std::ops::RangeInclusive<u16>) -> Result<StatusCode, String> {
    u16::try_from(code)
        .ok()
        .filter(|c| range.contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| format!("{code} is not a status from {} to {}", range.start(), range.end()))
}

//! The routing decision: which VirtualService route of the called service takes a request, and
//! what follows (forward where and with which rewrite, redirect, answer directly, or no route).
//! One pure [`route`] over the configuration, the request head and the connection; the proxy
//! around it does the I/O, looks destinations up in the mesh state and applies the changes.
//!
//! Istio's semantics, as Envoy carries them out in Istio's waypoint:
//! - The routes are the called service's (the CONNECT authority picks the service and port).
//!   A service this waypoint does not serve, or a port the service does not have, has no route.
//! - Routes in order, the first that matches wins. A route without `match` entries matches every
//!   request; with entries, one entry must match, and all conditions of an entry must hold.
//!   Nothing matches: 404 with flag NR. A service without routes sends every request to itself,
//!   on the port it was sent to.
//! - `uri`: exact and regex look at the path without its query, prefix at the whole `:path`
//!   (Envoy's rules); `ignoreUriCase` makes exact and prefix ignore ASCII case. Regexes match
//!   whole values.
//! - Headers: names ignore case; several values of one header are matched joined with `,`; a
//!   value match needs the header. `withoutHeaders` is Envoy's inverted match: a value condition
//!   holds when the header is present with another value (not when it is absent), a presence
//!   condition when the header is absent. `:authority`/`host`, `:method`, `:path` and `:scheme`
//!   are the request's.
//! - Query parameters come from the path: the first occurrence of the name, percent-decoded.
//! - `port` is the service port the request was sent to; `sourceNamespace` is the namespace of
//!   the peer's identity; `sourceLabels` are the source workload's labels when the caller knows
//!   them (Istio's waypoint compares them with its own labels, which selects nothing useful).
//! - Among weighted destinations the caller's number picks (see
//!   [`crate::model::WeightedDestinations::pick`]), so tests and the proxy's random source agree.
//! - A `uri` rewrite replaces what the matching entry's `uri` condition matched (its prefix; the
//!   whole path of an exact or regex match; the leading `/` when there is no `uri` condition); a
//!   regex rewrite replaces every match in the path. Both keep the query. The authority is
//!   rewritten by the destination's `host` header, else the route's `rewrite.authority`, else
//!   the route's `host` header (Envoy's precedence, as Istio configures it).
//! - Header changes apply the destination's before the route's, so the route's win (Envoy's
//!   default order).
//! - A redirect's `Location` is Envoy's: the redirect's scheme, else the request's; its
//!   authority, else the request's, without its port when the redirect sets a port or changes
//!   the scheme away from the one that port is the default of (`http://a:80` to `https://a`);
//!   the redirect's port; its `uri` as the path, keeping the request's query unless the `uri`
//!   has one.
//!
//! Left to the caller: path normalization (Envoy's happens before routing and authorization
//! alike), the mesh lookup of a destination and its endpoints ([`crate::balance`]: 503 with flag
//! NC when the host is not a service or the subset is not defined), and traffic addressed to a
//! workload rather than a service. Nothing a request carries can panic here.

use std::borrow::Cow;
use std::collections::BTreeMap;

use http::{HeaderMap, StatusCode};

use weft_core::identity::Identity;
use weft_core::telemetry::ResponseFlags;

use crate::model::{
    Action, HeaderKey, HeaderMatch, Headers, HttpMatch, HttpRoute, QueryMatch, Redirect as RedirectConfig,
    Service, StringMatch, UriRewrite, ValueMatch, Waypoint,
};

/// What routing reads of a request: its head, as sent (HTTP/1 `Host` is the authority).
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'r> {
    pub method: &'r str,
    /// `http` or `https`.
    pub scheme: &'r str,
    pub authority: &'r str,
    /// The path with its query, as sent (`:path`).
    pub path: &'r str,
    pub headers: &'r HeaderMap,
}

/// What routing reads of the connection the request came on.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'r> {
    /// The peer's identity (the source workload's), from its certificate.
    pub source: Option<&'r Identity>,
    /// The source workload's labels, when known.
    pub source_labels: Option<&'r BTreeMap<String, String>>,
    /// The hostname of the service the connection was sent to.
    pub service: &'r str,
    /// The service port it was sent to.
    pub port: u16,
}

/// What to do with a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision<'c> {
    Forward(Forward<'c>),
    /// Answer with a redirect: `status`, `Location: location`, no body.
    Redirect {
        route: &'c HttpRoute,
        status: StatusCode,
        location: String,
        headers: HeaderChanges<'c>,
    },
    /// Answer with `status` and `body`.
    DirectResponse {
        route: &'c HttpRoute,
        status: StatusCode,
        body: &'c [u8],
        headers: HeaderChanges<'c>,
    },
    /// Answer 404 with flag NR.
    NoRoute(NoRoute),
}

/// Forward the request to `target`, changed as said.
#[derive(Clone, Debug, PartialEq)]
pub struct Forward<'c> {
    /// The called service's configuration (subsets, traffic policy).
    pub service: &'c Service,
    /// The route that matched; `None` when the service has no routes (the default route).
    pub route: Option<&'c HttpRoute>,
    pub target: Target<'c>,
    /// The new path with its query; `None`: unchanged.
    pub path: Option<String>,
    /// The new authority; `None`: unchanged.
    pub authority: Option<&'c str>,
    pub headers: HeaderChanges<'c>,
}

/// Where a forwarded request goes. The host may be any service of the mesh; the caller looks it
/// up (and the subset in that host's DestinationRule) and answers 503 NC when either is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'c> {
    pub host: &'c str,
    pub subset: Option<&'c str>,
    pub port: u16,
}

/// The header changes that apply to a request and its response, in order.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HeaderChanges<'c> {
    /// The chosen destination's; applied first.
    pub destination: Option<&'c Headers>,
    /// The route's; applied last, so they win.
    pub route: Option<&'c Headers>,
}

/// Why a request has no route; each is a 404 with flag NR.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    #[error("no route of service {service} matches the request")]
    NoMatch { service: String },
    #[error("this waypoint does not serve {service}: is the service bound to it (istio.io/use-waypoint)?")]
    ServiceNotServed { service: String },
    #[error("service {service} has no port {port}")]
    PortNotServed { service: String, port: u16 },
}

impl HeaderChanges<'_> {
    /// Applies the request changes to a request's headers.
    pub fn apply_request(&self, headers: &mut HeaderMap) {
        for h in [self.destination, self.route].into_iter().flatten() {
            h.request.apply(headers);
        }
    }

    /// Applies the response changes to a response's headers.
    pub fn apply_response(&self, headers: &mut HeaderMap) {
        for h in [self.destination, self.route].into_iter().flatten() {
            h.response.apply(headers);
        }
    }
}

impl NoRoute {
    pub fn status(&self) -> StatusCode {
        StatusCode::NOT_FOUND
    }

    pub fn flags(&self) -> ResponseFlags {
        ResponseFlags::NoRouteFound
    }
}

/// The decision for `head`, sent on `conn` (see the module docs). `pick` chooses among weighted
/// destinations; the proxy passes a uniformly random number.
pub fn route<'c>(
    config: &'c Waypoint,
    head: &RequestHead<'_>,
    conn: &Connection<'_>,
    pick: u32,
) -> Decision<'c> {
    let Some(service) = config.services.get(conn.service) else {
        return Decision::NoRoute(NoRoute::ServiceNotServed { service: conn.service.to_owned() });
    };
    if !service.ports.contains(&conn.port) {
        return Decision::NoRoute(NoRoute::PortNotServed {
            service: service.hostname.clone(),
            port: conn.port,
        });
    }
    if service.routes.is_empty() {
        return Decision::Forward(Forward {
            service,
            route: None,
            target: Target { host: &service.hostname, subset: None, port: conn.port },
            path: None,
            authority: None,
            headers: HeaderChanges::default(),
        });
    }
    for route in &service.routes {
        let entry = if route.matches.is_empty() {
            Some(None)
        } else {
            route.matches.iter().find(|m| matches(m, head, conn)).map(Some)
        };
        if let Some(entry) = entry {
            return decide(service, route, entry, head, conn, pick);
        }
    }
    Decision::NoRoute(NoRoute::NoMatch { service: service.hostname.clone() })
}

/// What `route` does with the request, `entry` being the match entry that took it.
fn decide<'c>(
    service: &'c Service,
    route: &'c HttpRoute,
    entry: Option<&HttpMatch>,
    head: &RequestHead<'_>,
    conn: &Connection<'_>,
    pick: u32,
) -> Decision<'c> {
    let route_headers = HeaderChanges { destination: None, route: Some(&route.headers) };
    match &route.action {
        Action::Redirect(redirect) => Decision::Redirect {
            route,
            status: redirect.status,
            location: location(redirect, head),
            headers: route_headers,
        },
        Action::DirectResponse(response) => Decision::DirectResponse {
            route,
            status: response.status,
            body: &response.body,
            headers: route_headers,
        },
        Action::Forward { destinations, rewrite } => {
            let chosen = destinations.pick(pick);
            let target = Target {
                host: &chosen.destination.host,
                subset: chosen.destination.subset.as_deref(),
                port: chosen.destination.port.unwrap_or(conn.port),
            };
            let path = rewrite.uri.as_ref().map(|uri| rewritten_path(uri, entry, head.path));
            let authority = chosen
                .headers
                .authority
                .as_deref()
                .or(rewrite.authority.as_deref())
                .or(route.headers.authority.as_deref());
            Decision::Forward(Forward {
                service,
                route: Some(route),
                target,
                path,
                authority,
                headers: HeaderChanges { destination: Some(&chosen.headers), route: Some(&route.headers) },
            })
        }
    }
}

/// Whether every condition of the match entry holds.
fn matches(m: &HttpMatch, head: &RequestHead<'_>, conn: &Connection<'_>) -> bool {
    let (path, _) = split_query(head.path);
    if let Some(uri) = &m.uri {
        let hit = match uri {
            StringMatch::Exact(s) if m.ignore_uri_case => path.eq_ignore_ascii_case(s),
            StringMatch::Prefix(s) if m.ignore_uri_case => starts_with_ignore_case(head.path, s),
            StringMatch::Prefix(s) => head.path.starts_with(s.as_str()),
            StringMatch::Exact(_) | StringMatch::Regex(_) => string_matches(uri, path.as_bytes()),
        };
        if !hit {
            return false;
        }
    }
    let pseudo = [(&m.scheme, head.scheme), (&m.method, head.method), (&m.authority, head.authority)];
    if pseudo.iter().any(|(cond, value)| cond.as_ref().is_some_and(|c| !string_matches(c, value.as_bytes())))
    {
        return false;
    }
    if m.port.is_some_and(|p| p != conn.port) {
        return false;
    }
    if let Some(ns) = &m.source_namespace {
        if conn.source.map(Identity::namespace) != Some(ns.as_str()) {
            return false;
        }
    }
    if !m.source_labels.is_empty() {
        let Some(labels) = conn.source_labels else { return false };
        if !m.source_labels.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            return false;
        }
    }
    m.headers.iter().all(|h| header_holds(h, head))
        && m.without_headers.iter().all(|h| without_header_holds(h, head))
        && m.query_params.iter().all(|q| query_holds(q, head.path))
}

fn header_holds(h: &HeaderMatch, head: &RequestHead<'_>) -> bool {
    match (header_value(&h.key, head), &h.value) {
        (None, _) => false,
        (Some(_), ValueMatch::Present) => true,
        (Some(value), ValueMatch::Value(m)) => string_matches(m, &value),
    }
}

/// Envoy's `invert_match`: a missing header fails every inverted condition but presence.
fn without_header_holds(h: &HeaderMatch, head: &RequestHead<'_>) -> bool {
    match (header_value(&h.key, head), &h.value) {
        (None, ValueMatch::Present) => true,
        (None, ValueMatch::Value(_)) => false,
        (Some(_), ValueMatch::Present) => false,
        (Some(value), ValueMatch::Value(m)) => !string_matches(m, &value),
    }
}

fn query_holds(q: &QueryMatch, path: &str) -> bool {
    match (query_param(path, &q.name), &q.value) {
        (None, _) => false,
        (Some(_), ValueMatch::Present) => true,
        (Some(value), ValueMatch::Value(m)) => string_matches(m, &value),
    }
}

/// The value a header condition looks at: every value of the header joined with `,` (Envoy's
/// way), or the request's own for a pseudo-header.
fn header_value<'h>(key: &HeaderKey, head: &RequestHead<'h>) -> Option<Cow<'h, [u8]>> {
    let name = match key {
        HeaderKey::Authority => return Some(Cow::Borrowed(head.authority.as_bytes())),
        HeaderKey::Method => return Some(Cow::Borrowed(head.method.as_bytes())),
        HeaderKey::Path => return Some(Cow::Borrowed(head.path.as_bytes())),
        HeaderKey::Scheme => return Some(Cow::Borrowed(head.scheme.as_bytes())),
        HeaderKey::Name(name) => name,
    };
    let mut values = head.headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(Cow::Borrowed(first.as_bytes()));
    };
    let mut joined = first.as_bytes().to_vec();
    for value in std::iter::once(second).chain(values) {
        joined.push(b',');
        joined.extend_from_slice(value.as_bytes());
    }
    Some(Cow::Owned(joined))
}

fn string_matches(m: &StringMatch, value: &[u8]) -> bool {
    match m {
        StringMatch::Exact(s) => value == s.as_bytes(),
        StringMatch::Prefix(s) => value.starts_with(s.as_bytes()),
        StringMatch::Regex(p) => p.is_match(value),
    }
}

fn starts_with_ignore_case(value: &str, prefix: &str) -> bool {
    value.as_bytes().get(..prefix.len()).is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

/// The path and the query with its `?` (empty when there is none).
fn split_query(path: &str) -> (&str, &str) {
    match path.find('?') {
        Some(i) => path.split_at(i),
        None => (path, ""),
    }
}

/// The percent-decoded value of the first query parameter named `name` (a name without `=` has
/// the empty value).
fn query_param(path: &str, name: &str) -> Option<Vec<u8>> {
    let (_, query) = split_query(path);
    let query = query.strip_prefix('?')?;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name.as_bytes()).then(|| percent_decode(value))
    })
}

/// `%XX` sequences decoded; a `%` without two hex digits after it is kept as it is.
fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: Option<&u8>| b.and_then(|b| char::from(*b).to_digit(16));
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(high), Some(low)) => {
                // Two hex digits are at most 0xff.
                out.push(u8::try_from(high * 16 + low).unwrap_or(b'%'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// The path a `uri` rewrite makes of `path` (with its query), `entry` being the match entry
/// that took the request.
fn rewritten_path(rewrite: &UriRewrite, entry: Option<&HttpMatch>, path: &str) -> String {
    let (path_only, query) = split_query(path);
    match rewrite {
        UriRewrite::Regex(regex) => format!("{}{query}", regex.apply(path_only)),
        UriRewrite::Prefix(new) => {
            let replaced = match entry.and_then(|e| e.uri.as_ref()) {
                Some(StringMatch::Prefix(prefix)) => prefix.len(),
                Some(StringMatch::Exact(_) | StringMatch::Regex(_)) => path_only.len(),
                // Istio matches "no uri condition" as the prefix `/`.
                None => usize::from(path.starts_with('/')),
            };
            // The matched part ends on a character boundary (it matched bytes of a prefix, or is
            // the whole path); should it not, nothing is replaced rather than anything panicking.
            let rest = path.get(replaced..).unwrap_or(path);
            format!("{new}{rest}")
        }
    }
}

/// The `Location` of a redirect (see the module docs).
fn location(redirect: &RedirectConfig, head: &RequestHead<'_>) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(head.scheme);
    let port = redirect.port.map(|p| format!(":{p}")).unwrap_or_default();
    let host = match &redirect.authority {
        Some(authority) => authority.as_str(),
        None => request_host(head.authority, head.scheme, scheme, redirect.port.is_some()),
    };
    let path = match &redirect.uri {
        None => Cow::Borrowed(head.path),
        Some(uri) if uri.contains('?') => Cow::Borrowed(uri.as_str()),
        Some(uri) => Cow::Owned(format!("{uri}{}", split_query(head.path).1)),
    };
    format!("{scheme}://{host}{port}{path}")
}

/// The request's authority for a redirect: without its port when the redirect sets a port, or
/// changes the scheme and the port is the old scheme's default (Envoy's rule).
fn request_host<'a>(authority: &'a str, old_scheme: &str, new_scheme: &str, new_port: bool) -> &'a str {
    // An IPv6 literal's port follows `]`.
    let colon = match authority.rfind(']') {
        Some(bracket) => authority[bracket..].find(':').map(|i| bracket + i),
        None => authority.rfind(':'),
    };
    let Some(colon) = colon else { return authority };
    let (host, port) = authority.split_at(colon);
    let old_default = matches!((old_scheme, port), ("http", ":80") | ("https", ":443"));
    if new_port || (old_default && old_scheme != new_scheme) {
        host
    } else {
        authority
    }
}

#[cfg(test)]
mod tests;

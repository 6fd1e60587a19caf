//! Builders of `weft.waypoint.v1` resources for the unit tests: the controller's output, written
//! short.

use weft_core::proto::weft::waypoint::v1::{self as wp, string_match::MatchType};

pub const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";
pub const RATINGS: &str = "ratings.bookinfo.svc.cluster.local";
pub const VS: &str = "bookinfo/reviews";

pub fn exact(s: &str) -> wp::StringMatch {
    wp::StringMatch { match_type: Some(MatchType::Exact(s.into())) }
}

pub fn prefix(s: &str) -> wp::StringMatch {
    wp::StringMatch { match_type: Some(MatchType::Prefix(s.into())) }
}

pub fn regex(s: &str) -> wp::StringMatch {
    wp::StringMatch { match_type: Some(MatchType::Regex(s.into())) }
}

/// A match without a type: presence, for headers and query parameters.
pub fn any() -> wp::StringMatch {
    wp::StringMatch { match_type: None }
}

pub fn to(host: &str, subset: &str, weight: u32) -> wp::WeightedDestination {
    wp::WeightedDestination {
        destination: Some(wp::Destination { host: host.into(), subset: subset.into(), port: 0 }),
        weight,
        headers: None,
    }
}

/// A route of the VirtualService `bookinfo/reviews` with these match entries and destinations.
pub fn http(matches: Vec<wp::HttpMatch>, destinations: Vec<wp::WeightedDestination>) -> wp::HttpRoute {
    wp::HttpRoute { virtual_service: VS.into(), matches, destinations, ..Default::default() }
}

/// A match entry on the uri alone.
pub fn uri(m: wp::StringMatch) -> wp::HttpMatch {
    wp::HttpMatch { uri: Some(m), ..Default::default() }
}

/// A match entry on one header.
pub fn header(name: &str, m: wp::StringMatch) -> wp::HttpMatch {
    wp::HttpMatch { headers: [(name.to_owned(), m)].into(), ..Default::default() }
}

/// The service `reviews` (port 9080) with these routes.
pub fn reviews(routes: Vec<wp::HttpRoute>) -> wp::Service {
    wp::Service {
        hostname: REVIEWS.into(),
        name: "reviews".into(),
        namespace: "bookinfo".into(),
        ports: vec![9080],
        http_routes: routes,
        virtual_services: vec![VS.into()],
        ..Default::default()
    }
}

/// The waypoint `bookinfo/waypoint` serving these services.
pub fn waypoint(services: Vec<wp::Service>) -> wp::Waypoint {
    wp::Waypoint {
        name: "waypoint".into(),
        namespace: "bookinfo".into(),
        identity: "spiffe://cluster.local/ns/bookinfo/sa/waypoint".into(),
        services,
        ..Default::default()
    }
}

pub fn secs(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

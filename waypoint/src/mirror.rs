//! Traffic mirroring (a route's `mirrors`, or `mirror` with `mirrorPercentage`): a copy of the
//! request goes to each mirror destination its percentage picks, fire and forget, as Envoy's
//! request mirror policies do for Istio.
//!
//! - The copy has the forwarded request's headers (after the route's changes) and its body
//!   once the client has sent all of it ([`Recording::complete`]); a body too large to keep is
//!   not mirrored. Its authority gets `-shadow` appended to the host (Envoy's rule:
//!   `echo:8080` becomes `echo-shadow:8080`).
//! - Its response is read and discarded; its failure is logged at debug level. Nothing about a
//!   mirror delays or fails the primary request: it runs in its own task, and at most
//!   [`MAX_MIRRORS_IN_FLIGHT`] run at once (beyond that a copy is dropped and counted).
//! - Which mirrors fire is pure ([`pick`]); sending is [`crate::send::mirror`].

use crate::model::Mirror;

/// Mirrored requests in flight at once, across the waypoint.
pub const MAX_MIRRORS_IN_FLIGHT: usize = 1024;

/// The mirrors a request is copied to: each drawn on its own (`draw()` uniform in `[0, 100)`)
/// against its percentage.
pub fn pick(mirrors: &[Mirror], mut draw: impl FnMut() -> f64) -> Vec<&Mirror> {
    mirrors.iter().filter(|m| draw() < m.percentage.value()).collect()
}

/// Envoy's shadow authority: `-shadow` after the host, before any port.
pub fn shadow_authority(authority: &str) -> String {
    // An IPv6 literal's colons are inside brackets; the port's colon is after them.
    let port_colon = match authority.rfind(']') {
        Some(end) => authority[end..].find(':').map(|i| end + i),
        None => authority.rfind(':'),
    };
    match port_colon {
        Some(i) => format!("{}-shadow{}", &authority[..i], &authority[i..]),
        None => format!("{authority}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Destination, Percent};

    fn mirror(host: &str, percentage: f64) -> Mirror {
        Mirror {
            destination: Destination { host: host.into(), subset: None, port: None },
            percentage: Percent::try_from(percentage).unwrap(),
        }
    }

    #[test]
    fn each_mirror_is_drawn_on_its_own() {
        let mirrors = [mirror("a", 100.0), mirror("b", 50.0), mirror("c", 0.0)];
        let hosts = |draws: [f64; 3]| {
            let mut draws = draws.into_iter();
            pick(&mirrors, || draws.next().unwrap())
                .iter()
                .map(|m| m.destination.host.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(hosts([99.9, 49.9, 0.0]), ["a", "b"]);
        assert_eq!(hosts([0.0, 50.0, 0.0]), ["a"]);
    }

    #[test]
    fn shadow_goes_after_the_host_and_before_the_port() {
        for (authority, shadow) in [
            ("echo", "echo-shadow"),
            ("echo.shop.svc.cluster.local:8080", "echo.shop.svc.cluster.local-shadow:8080"),
            ("10.96.0.60:80", "10.96.0.60-shadow:80"),
            ("[fd00::1]:80", "[fd00::1]-shadow:80"),
            ("[fd00::1]", "[fd00::1]-shadow"),
        ] {
            assert_eq!(shadow_authority(authority), shadow);
        }
    }
}

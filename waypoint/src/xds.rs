//! What the waypoint subscribes to over delta ADS: the mesh (Istio's `Address` and
//! `Authorization`, into the shared `ProxyState` as ztunnel keeps it) and its own
//! `weft.waypoint.v1.Waypoint` resource, converted into [`crate::model::Waypoint`] where it
//! enters. A resource of another waypoint is refused (the controller sends none; a wrong one is
//! NACKed rather than served).

use std::sync::Arc;

use prost::Message;
use weft_core::proto::weft::waypoint::v1 as wp;
use weft_core::proto::WAYPOINT_TYPE_URL;
use weft_core::state::{ProxyState, Shared};
use weft_core::xds::{apply_mesh, Handler, MeshHandler, MeshResource};

use crate::jwks::Jwks;
use crate::jwt::KeySource;
use crate::model::Waypoint;

/// A decoded resource.
pub enum Resource {
    Mesh(MeshResource),
    Waypoint(Box<Waypoint>),
}

/// The waypoint's xDS handler.
pub struct WaypointHandler {
    /// `<namespace>/<name>`: the one Waypoint resource taken.
    pub resource_name: String,
    pub waypoint: Arc<Shared<Option<Waypoint>>>,
    pub mesh: MeshHandler,
    /// Fetches the JWKS a new configuration names (off the data path), drops those it no
    /// longer names.
    pub jwks: Jwks,
}

impl WaypointHandler {
    pub fn new(
        resource_name: String,
        waypoint: Arc<Shared<Option<Waypoint>>>,
        state: Arc<Shared<ProxyState>>,
        jwks: Jwks,
    ) -> Self {
        WaypointHandler { resource_name, waypoint, mesh: MeshHandler { state }, jwks }
    }

    /// Starts fetching every `jwksUri` of `waypoint` and forgets the others.
    fn fetch_keys(&self, waypoint: &Waypoint) {
        let rules = waypoint
            .security
            .request_authentications
            .iter()
            .chain(waypoint.services.values().flat_map(|s| s.security.request_authentications.iter()))
            .flat_map(|ra| ra.rules.iter());
        let mut uris = Vec::new();
        for rule in rules {
            if let KeySource::Remote(uri) = &rule.keys {
                self.jwks.ensure(uri, rule.timeout);
                uris.push(uri.clone());
            }
        }
        self.jwks.retain(|uri| uris.iter().any(|u| u == uri));
    }
}

impl Handler for WaypointHandler {
    type Resource = Resource;

    fn type_urls(&self) -> Vec<&'static str> {
        let mut urls = self.mesh.type_urls();
        urls.push(WAYPOINT_TYPE_URL);
        urls
    }

    fn decode(&self, type_url: &str, name: &str, body: &[u8]) -> Result<Resource, String> {
        if type_url != WAYPOINT_TYPE_URL {
            return self.mesh.decode(type_url, name, body).map(Resource::Mesh);
        }
        if name != self.resource_name {
            return Err(format!("{name}: this waypoint is {}, not {name}", self.resource_name));
        }
        let proto = wp::Waypoint::decode(body)
            .map_err(|e| format!("{name}: not a weft.waypoint.v1.Waypoint: {e}"))?;
        Waypoint::try_from(proto).map(|w| Resource::Waypoint(Box::new(w))).map_err(|e| e.to_string())
    }

    fn apply(
        &self,
        type_url: &str,
        removed: &[String],
        resources: Vec<(String, Resource)>,
    ) -> Vec<(String, String)> {
        if type_url == WAYPOINT_TYPE_URL {
            if removed.contains(&self.resource_name) {
                self.waypoint.update(|w| *w = None);
            }
            for (_, resource) in resources {
                if let Resource::Waypoint(waypoint) = resource {
                    self.fetch_keys(&waypoint);
                    self.waypoint.update(|w| *w = Some(*waypoint));
                }
            }
            return Vec::new();
        }
        let mesh = resources
            .into_iter()
            .filter_map(|(name, r)| match r {
                Resource::Mesh(m) => Some((name, m)),
                Resource::Waypoint(_) => None,
            })
            .collect();
        self.mesh.state.update(|state| apply_mesh(state, type_url, removed, mesh))
    }
}

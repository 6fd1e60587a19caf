//! The delta-xDS bookkeeping of one type on one stream, as pure functions: what the client
//! subscribed to (all, or some names), what the server believes it holds (name -> version), and so
//! what the next response must carry. No I/O here; the connection drives it.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::resources::XdsResource;

/// The name that stands for "every resource of the type".
pub(super) const WILDCARD: &str = "*";

/// One type's subscription on one stream.
#[derive(Debug, Default)]
pub(super) struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    held: BTreeMap<String, String>,
}

/// What a response must carry: resources to add or replace, and names to remove.
#[derive(Debug, Default)]
pub(super) struct Delta<'s> {
    pub upserts: Vec<&'s XdsResource>,
    pub removed: Vec<String>,
}

impl Subscription {
    /// The subscription a type's first request opens. An empty subscribe list means the wildcard
    /// (Istio's ztunnel relies on this); `initial` is what a reconnecting client says it holds.
    /// Returns the names the response must answer even if the client holds them already.
    pub fn open(
        subscribe: &[String],
        unsubscribe: &[String],
        initial: BTreeMap<String, String>,
    ) -> (Subscription, BTreeSet<String>) {
        let mut sub = Subscription { wildcard: subscribe.is_empty(), names: BTreeSet::new(), held: initial };
        let forced = sub.change(subscribe, unsubscribe);
        (sub, forced)
    }

    /// Applies a later request's subscribe and unsubscribe lists (subscribe first, so `*` in both
    /// means "nothing", as Istio's ztunnel sends in on-demand mode). Returns the names the next
    /// response must answer even if the client holds them already.
    pub fn change(&mut self, subscribe: &[String], unsubscribe: &[String]) -> BTreeSet<String> {
        let mut forced = BTreeSet::new();
        for name in subscribe {
            if name == WILDCARD {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
                forced.insert(name.clone());
            }
        }
        for name in unsubscribe {
            if name == WILDCARD {
                self.wildcard = false;
                // The client drops what only the wildcard gave it.
                let names = &self.names;
                self.held.retain(|held, _| names.contains(held));
            } else {
                self.names.remove(name);
                forced.remove(name);
                if !self.wildcard {
                    self.held.remove(name);
                }
            }
        }
        forced
    }

    /// What to send so the client holds exactly what it subscribed to of `visible`: resources it
    /// lacks or holds at another version (and every resource answering a `forced` name), and the
    /// names it holds that it should not, plus `forced` names that match nothing (so a client asking
    /// for a name learns it does not exist).
    pub fn delta<'s>(&self, visible: &[&'s XdsResource], forced: &BTreeSet<String>) -> Delta<'s> {
        let wanted: Vec<&'s XdsResource> = visible.iter().copied().filter(|r| self.covers(r)).collect();
        let wanted_names: HashSet<&str> = wanted.iter().map(|r| r.name()).collect();
        let answers = |r: &XdsResource, names: &BTreeSet<String>| {
            names.contains(r.name()) || r.aliases().iter().any(|a| names.contains(a))
        };
        let upserts: Vec<&'s XdsResource> = wanted
            .iter()
            .copied()
            .filter(|r| {
                self.held.get(r.name()).map(String::as_str) != Some(r.version()) || answers(r, forced)
            })
            .collect();
        let mut removed: BTreeSet<String> =
            self.held.keys().filter(|n| !wanted_names.contains(n.as_str())).cloned().collect();
        for name in forced {
            if !wanted.iter().any(|r| r.answers_to(name)) {
                removed.insert(name.clone());
            }
        }
        Delta { upserts, removed: removed.into_iter().collect() }
    }

    /// Records that `delta` went out: the client now holds its upserts and none of its removals.
    pub fn sent(&mut self, delta: &Delta<'_>) {
        for r in &delta.upserts {
            self.held.insert(r.name().to_owned(), r.version().to_owned());
        }
        for name in &delta.removed {
            self.held.remove(name);
        }
    }

    pub fn wildcard(&self) -> bool {
        self.wildcard
    }

    /// The names subscribed explicitly.
    pub fn names(&self) -> &BTreeSet<String> {
        &self.names
    }

    /// What the server believes the client holds: name -> version.
    #[cfg(test)]
    pub fn held(&self) -> &BTreeMap<String, String> {
        &self.held
    }

    fn covers(&self, r: &XdsResource) -> bool {
        self.wildcard || self.names.contains(r.name()) || r.aliases().iter().any(|a| self.names.contains(a))
    }
}

impl Delta<'_> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use prost_types::Any;

    use super::*;

    fn res(name: &str, version: &str) -> XdsResource {
        XdsResource::new(name, version, Any { type_url: "t".into(), value: Vec::new() })
    }

    fn names(delta: &Delta<'_>) -> (Vec<String>, Vec<String>) {
        let up = delta.upserts.iter().map(|r| format!("{}@{}", r.name(), r.version())).collect();
        (up, delta.removed.clone())
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    fn set(s: &[&str]) -> BTreeSet<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn wildcard_first_then_changes() {
        let (a1, b1, b2, c1) = (res("a", "1"), res("b", "1"), res("b", "2"), res("c", "1"));
        let (mut sub, forced) = Subscription::open(&[], &[], BTreeMap::new());
        assert!(sub.wildcard() && forced.is_empty());
        let d = sub.delta(&[&a1, &b1], &forced);
        assert_eq!(names(&d), (strings(&["a@1", "b@1"]), vec![]));
        sub.sent(&d);
        // Nothing changed: nothing to send.
        assert!(sub.delta(&[&a1, &b1], &BTreeSet::new()).is_empty());
        // b changed, c added, a removed.
        let d = sub.delta(&[&b2, &c1], &BTreeSet::new());
        assert_eq!(names(&d), (strings(&["b@2", "c@1"]), strings(&["a"])));
        sub.sent(&d);
        assert_eq!(sub.held(), &[("b".into(), "2".into()), ("c".into(), "1".into())].into());
    }

    #[test]
    fn reconnect_with_initial_versions() {
        // Client holds a@1 (current), b@0 (stale), gone@1 (deleted meanwhile); lacks c.
        let initial: BTreeMap<String, String> =
            [("a", "1"), ("b", "0"), ("gone", "1")].iter().map(|(n, v)| ((*n).into(), (*v).into())).collect();
        let (a1, b1, c1) = (res("a", "1"), res("b", "1"), res("c", "1"));
        let (sub, forced) = Subscription::open(&[], &[], initial);
        let d = sub.delta(&[&a1, &b1, &c1], &forced);
        assert_eq!(names(&d), (strings(&["b@1", "c@1"]), strings(&["gone"])));
        // Istio's ztunnel sends empty versions: everything it holds is resent.
        let (sub, forced) = Subscription::open(&[], &[], [("a".to_owned(), String::new())].into());
        assert_eq!(names(&sub.delta(&[&a1], &forced)), (strings(&["a@1"]), vec![]));
    }

    #[test]
    fn explicit_names_aliases_and_on_demand() {
        let a = res("uid-a", "1").with_aliases(strings(&["/10.0.0.1"]));
        let b = res("uid-b", "1");
        // ztunnel's on-demand mode: subscribe and unsubscribe "*" at once = nothing.
        let (mut sub, forced) = Subscription::open(&strings(&["*"]), &strings(&["*"]), BTreeMap::new());
        assert!(!sub.wildcard());
        assert!(sub.delta(&[&a, &b], &forced).is_empty());
        // Ask by alias, and for a name that does not exist.
        let forced = sub.change(&strings(&["/10.0.0.1", "/10.0.0.9"]), &[]);
        let d = sub.delta(&[&a, &b], &forced);
        assert_eq!(names(&d), (strings(&["uid-a@1"]), strings(&["/10.0.0.9"])));
        sub.sent(&d);
        // Asking again for what it holds still answers it.
        let forced = sub.change(&strings(&["/10.0.0.1"]), &[]);
        assert_eq!(names(&sub.delta(&[&a, &b], &forced)).0, strings(&["uid-a@1"]));
        // A push without changes sends nothing; uid-b stays out.
        assert!(sub.delta(&[&a, &b], &BTreeSet::new()).is_empty());
        assert_eq!(sub.names(), &set(&["/10.0.0.1", "/10.0.0.9"]));
    }

    #[test]
    fn unsubscribe() {
        let (a, b) = (res("a", "1"), res("b", "1"));
        let (mut sub, forced) = Subscription::open(&strings(&["a", "b"]), &[], BTreeMap::new());
        assert!(!sub.wildcard());
        let d = sub.delta(&[&a, &b], &forced);
        sub.sent(&d);
        let forced = sub.change(&[], &strings(&["b"]));
        assert!(forced.is_empty());
        // The client forgot b itself: no removal, and b is no longer pushed.
        assert!(sub.delta(&[&a, &b], &forced).is_empty());
        assert_eq!(sub.held().keys().collect::<Vec<_>>(), ["a"]);
        // Dropping the wildcard forgets what only the wildcard gave.
        let (mut sub, forced) = Subscription::open(&strings(&["*", "a"]), &[], BTreeMap::new());
        let d = sub.delta(&[&a, &b], &forced);
        sub.sent(&d);
        sub.change(&[], &strings(&["*"]));
        assert_eq!(sub.held().keys().collect::<Vec<_>>(), ["a"]);
        assert!(sub.delta(&[&a, &b], &BTreeSet::new()).is_empty());
    }
}

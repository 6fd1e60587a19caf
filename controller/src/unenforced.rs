//! Logs what the model holds that Weft accepts but does not enforce as written: the list
//! `weft_config::not_enforced` makes (the one `weft analyze` prints), one warning per entry when
//! it first appears or its text changes, not on every snapshot. Knows nothing of xDS.

use std::collections::BTreeSet;

use weft_config::{not_enforced, AnalyzeOptions, Object};

use crate::model::Model;

/// What was logged for the previous model.
#[derive(Debug, Default)]
pub struct Reporter {
    logged: BTreeSet<String>,
}

impl Reporter {
    /// Logs each entry for `model` that was not there (with the same text) for the previous one,
    /// and returns them. An entry that goes away and comes back is logged again.
    pub fn report(&mut self, model: &Model) -> Vec<String> {
        let objects: Vec<&Object> = model.objects().collect();
        let current: BTreeSet<String> =
            not_enforced(&objects, &AnalyzeOptions::default()).iter().map(ToString::to_string).collect();
        let new: Vec<String> = current.difference(&self.logged).cloned().collect();
        for line in &new {
            tracing::warn!("not enforced: {line}");
        }
        self.logged = current;
        new
    }
}

#[cfg(test)]
mod tests {
    use weft_config::load_yaml;

    use super::*;
    use crate::model::{from_yaml as model, Change, ObjectKey};

    /// The example `weft analyze` is tested on: the controller logs the same entries, once.
    #[test]
    fn each_entry_is_logged_once_per_object_and_change() {
        let mut model = model(include_str!("../../examples/unenforced/mesh.yaml"));
        let mut reporter = Reporter::default();
        let first = reporter.report(&model);
        let objects: Vec<&str> =
            first.iter().filter_map(|l| l.split(' ').nth(1)).map(|n| n.trim_end_matches(':')).collect();
        assert_eq!(first.len(), 6, "{first:#?}");
        for name in [
            "shop/product-service-authz",
            "shop/products-jwt",
            "shop/shop-gateway",
            "shop/shop",
            "shop/payments-api",
            "istio-system/mesh-default",
        ] {
            assert!(objects.contains(&name), "{name} not in {first:#?}");
        }
        assert!(first.iter().any(|l| l.starts_with(
            "AuthorizationPolicy shop/product-service-authz spec.rules[0].to[0].operation.methods: ztunnel enforces"
        )));
        // Nothing new: nothing logged.
        assert!(reporter.report(&model).is_empty());
        // A changed object is logged again, with its new text; the others are not.
        let changed = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: shop, namespace: shop}\nspec:\n  hosts: [shop.example.com]\n  gateways: [other-gateway]\n  http: [{route: [{destination: {host: productpage}}]}]\n";
        model.apply(Change::Upsert(Box::new(load_yaml(changed, "c.yaml").remove(0).result.unwrap().object)));
        let again = reporter.report(&model);
        assert_eq!(again.len(), 1, "{again:#?}");
        assert!(again[0].contains("routes for gateway other-gateway are not enforced"), "{again:#?}");
        // Gone, then back: logged again.
        let key = ObjectKey {
            kind: "Telemetry".into(),
            namespace: "istio-system".into(),
            name: "mesh-default".into(),
        };
        let telemetry = model.get(&key).cloned().unwrap();
        model.apply(Change::Delete(key));
        assert!(reporter.report(&model).is_empty());
        model.apply(Change::Upsert(Box::new(telemetry)));
        assert_eq!(reporter.report(&model).len(), 1);
    }

    /// Kinds Weft does not implement stay in the model so that they are reported.
    #[test]
    fn unsupported_kinds_are_reported() {
        let model = model("apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: lua, namespace: istio-system}\nspec: {}\n");
        let logged = Reporter::default().report(&model);
        assert_eq!(
            logged,
            ["EnvoyFilter istio-system/lua: EnvoyFilter (networking.istio.io/v1alpha3) is not supported by Weft; it has no effect"]
        );
    }
}

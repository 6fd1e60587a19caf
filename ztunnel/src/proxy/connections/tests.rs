//! Tests of the open-connection registry and its re-check task (with `inbound::recheck`), against
//! a state the tests edit; no sockets.

use std::net::SocketAddr;
use std::time::Duration;

use weft_core::proto::istio::security::{Action, Match, Scope};
use weft_core::testing::resources::*;

use super::*;
use crate::outbound::tests::node_mesh;

const NODE: &str = "node-a";

fn admitted(sa: &str) -> Admitted {
    Admitted {
        src_identity: Some(weft_core::testing::identity("shop", sa)),
        src_ip: ip("10.0.2.9"),
        dst: "10.0.1.5:8080".parse::<SocketAddr>().unwrap(),
    }
}

fn registry() -> (Arc<Shared<ProxyState>>, Arc<Connections>) {
    let state = Arc::new(Shared::new(node_mesh()));
    let connections = Arc::new(Connections::new(Arc::clone(&state), NODE.into()));
    (state, connections)
}

fn deny(state: &Shared<ProxyState>, sa: &str) {
    let principal = format!("cluster.local/ns/shop/sa/{sa}");
    let rule = Match { principals: vec![exact(&principal)], ..Default::default() };
    state.update(|s| {
        add_policy(s, policy("shop", "deny", Scope::Namespace, Action::Deny, vec![vec![vec![rule]]]))
    });
}

/// Whether `registered` was told to close (within a moment of paused time).
async fn told(registered: &mut Registered) -> Option<InboundRefusal> {
    tokio::time::timeout(Duration::from_millis(10), registered.closed()).await.ok().map(|c| c.refusal)
}

#[tokio::test(start_paused = true)]
async fn a_recheck_closes_the_denied_and_leaves_the_rest() {
    let (state, connections) = registry();
    let checked = state.load();
    let mut good = connections.register(admitted("good"), &checked);
    let mut bad = connections.register(admitted("bad"), &checked);
    assert_eq!(connections.recheck(), 0, "nothing changed");

    deny(&state, "bad");
    assert_eq!(connections.recheck(), 1);
    match told(&mut bad).await {
        Some(InboundRefusal::Denied { policy, .. }) => assert_eq!(policy.as_deref(), Some("shop/deny")),
        other => panic!("shop/bad not closed: {other:?}"),
    }
    assert!(told(&mut good).await.is_none(), "shop/good was closed");
    // Told once: a further update does not count it again.
    assert_eq!(connections.recheck(), 0);
    assert_eq!(connections.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_entry_leaves_with_its_connection() {
    let (state, connections) = registry();
    let checked = state.load();
    let first = connections.register(admitted("good"), &checked);
    let second = connections.register(admitted("bad"), &checked);
    assert_eq!(connections.len(), 2);
    drop(first);
    assert_eq!(connections.len(), 1);
    // A connection told to close, then gone, leaves too; telling a gone one is harmless.
    deny(&state, "bad");
    drop(second);
    assert_eq!(connections.recheck(), 0);
    assert_eq!(connections.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_update_between_the_check_and_the_registration_is_not_missed() {
    let (state, connections) = registry();
    let checked = state.load();
    // The update lands, and the re-check runs, before this connection registers.
    deny(&state, "bad");
    assert_eq!(connections.recheck(), 0);
    let mut bad = connections.register(admitted("bad"), &checked);
    let mut good = connections.register(admitted("good"), &checked);
    assert!(told(&mut bad).await.is_some(), "shop/bad, checked before the DENY, was let through");
    assert!(told(&mut good).await.is_none());
}

#[tokio::test(start_paused = true)]
async fn each_update_triggers_a_recheck() {
    let (state, connections) = registry();
    let (updates, receiver) = watch::channel(0u64);
    let task = {
        let connections = Arc::clone(&connections);
        tokio::spawn(async move { connections.recheck_on_updates(receiver).await })
    };
    let mut bad = connections.register(admitted("bad"), &state.load());
    tokio::task::yield_now().await;
    assert!(told(&mut bad).await.is_none());

    deny(&state, "bad");
    updates.send_modify(|generation| *generation += 1);
    assert!(told(&mut bad).await.is_some(), "the update closed nothing");

    // The updates ending does not end the task (the proxy's run would end with it).
    drop(updates);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!task.is_finished());
    task.abort();
}

//! The stores keep replayed states between transactions; a kept state must never be used once
//! another writer appended to the saga's log. Two stores (as two orchestrators would have,
//! each with its own memory) apply one saga's results in turn. A saga started through the
//! store of an orchestrator running in the same process is kept from its start.

use std::sync::Arc;

use saga_core::store::{Applied, LocalRelay};
use saga_core::{
    Client, Command, Direction, Event, Input, Outcome, QueryStore, Registry, Reply, SagaStatus,
    SagaStore, Store, Verdict,
};
use saga_tests::database;
use saga_tests::order::{self, Order};
use uuid::Uuid;

/// The reply to the saga's last dispatched command, as a success.
async fn answer_last(store: &dyn Store, id: Uuid) -> (Uuid, Input) {
    let history = store.history(id).await.unwrap();
    let (step, direction, attempt, command_id) = history
        .iter()
        .rev()
        .find_map(|e| match e.event {
            Event::Dispatched {
                step,
                direction,
                attempt,
                command_id,
                ..
            } => Some((step, direction, attempt, command_id)),
            _ => None,
        })
        .expect("a dispatched command");
    assert_eq!(direction, Direction::Forward);
    let reply = Reply {
        saga_id: id,
        step,
        direction,
        attempt,
        command_id,
        outcome: Outcome::Success {
            output: serde_json::json!({"step": step}),
        },
    };
    (id, Input::Reply(reply))
}

fn verdict(applied: &[Applied]) -> &Verdict {
    &applied[0].verdict
}

#[tokio::test]
async fn a_kept_state_is_not_used_after_another_writer_appended() {
    let db = database().await;
    let (a, b) = (db.store(), db.store());
    let def = order::definition();
    let mut registry = Registry::new();
    registry.register(&def);
    let id = Client::new(Arc::new(a.clone()))
        .start(&def, &Order::default())
        .await
        .unwrap()
        .saga_id;

    // A applies the reservation's result and keeps the state (charge dispatched).
    let applied = a
        .apply(&registry, vec![answer_last(&a, id).await])
        .await
        .unwrap();
    assert_eq!(verdict(&applied), &Verdict::Applied);
    // B applies the charge's result: the shipment is dispatched, which A's kept state lacks.
    let applied = b
        .apply(&registry, vec![answer_last(&b, id).await])
        .await
        .unwrap();
    assert_eq!(verdict(&applied), &Verdict::Applied);
    // A must read the log again: with its kept state the shipment's command would be unknown
    // (a verdict with nothing to write, which the write statement checks like the others).
    let applied = a
        .apply(&registry, vec![answer_last(&a, id).await])
        .await
        .unwrap();
    assert_eq!(verdict(&applied), &Verdict::Applied, "{applied:?}");
    assert_eq!(applied[0].status, Some(SagaStatus::Completed));

    // The log is the one replay gives: each step answered once, in order.
    let succeeded: Vec<u32> = a
        .history(id)
        .await
        .unwrap()
        .iter()
        .filter_map(|e| match e.event {
            Event::Succeeded { step, .. } => Some(step),
            _ => None,
        })
        .collect();
    assert_eq!(succeeded, [0, 1, 2]);
    db.drop_schema().await;
}

/// Deletes the saga's last event around the store, leaving its row's count as it was.
async fn delete_last_event(db: &saga_tests::TestDb, id: Uuid) {
    let sql = format!(
        "DELETE FROM \"{0}\".events WHERE saga_id = $1 \
         AND seq = (SELECT max(seq) FROM \"{0}\".events WHERE saga_id = $1)",
        db.schema
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
}

/// The error of a log that holds fewer events than its row counts: final, not retried.
fn assert_miscounted(err: &saga_core::Error) {
    assert!(err.to_string().contains("SAGA-R005"), "{err}");
    assert!(!err.is_transient(), "{err}");
}

/// Counts the saga's events that match `pick`.
async fn count(store: &dyn Store, id: Uuid, pick: impl Fn(&Event) -> bool) -> usize {
    let history = store.history(id).await.unwrap();
    history.iter().filter(|e| pick(&e.event)).count()
}

/// Two stores on one schema, and two order sagas whose reservations store `a` applied (so it
/// keeps both states, their charges dispatched): `moved`, which the tests move on through
/// `b`, and `still`, which only `a` touches.
struct TwoWriters {
    db: saga_tests::TestDb,
    a: saga_core::PgStore,
    b: saga_core::PgStore,
    registry: Registry,
    moved: Uuid,
    still: Uuid,
}

async fn two_writers() -> TwoWriters {
    let db = database().await;
    let (a, b) = (db.store(), db.store());
    let def = order::definition();
    let mut registry = Registry::new();
    registry.register(&def);
    let client = Client::new(Arc::new(a.clone()));
    let moved = client.start(&def, &Order::default()).await.unwrap().saga_id;
    let still = client.start(&def, &Order::default()).await.unwrap().saga_id;
    let applied = a
        .apply(
            &registry,
            vec![answer_last(&a, moved).await, answer_last(&a, still).await],
        )
        .await
        .unwrap();
    assert!(
        applied.iter().all(|x| x.verdict == Verdict::Applied),
        "{applied:?}"
    );
    TwoWriters {
        db,
        a,
        b,
        registry,
        moved,
        still,
    }
}

#[tokio::test]
async fn a_result_decided_from_a_kept_state_another_writer_moved_on_is_not_written_twice() {
    let TwoWriters {
        db,
        a,
        b,
        registry,
        moved,
        still,
    } = two_writers().await;
    // B applies `moved`'s charge result; A's kept state of `moved` still waits for it.
    let charge = answer_last(&b, moved).await;
    let applied = b.apply(&registry, vec![charge.clone()]).await.unwrap();
    assert_eq!(verdict(&applied), &Verdict::Applied);

    // The same charge result reaches A again, twice (redeliveries), around `still`'s charge
    // result in the same batch. From its kept state A would take the first duplicate for new
    // and dispatch the shipment a second time; its row shows the log moved on, so A applies
    // `moved`'s inputs again from the log, and `still`'s as decided.
    let applied = a
        .apply(
            &registry,
            vec![charge.clone(), answer_last(&a, still).await, charge],
        )
        .await
        .unwrap();
    for duplicate in [&applied[0], &applied[2]] {
        assert_eq!(duplicate.saga_id, moved);
        assert!(
            matches!(duplicate.verdict, Verdict::Ignored(_)),
            "the duplicate is dropped: {applied:?}"
        );
        assert!(duplicate.outbox.is_empty(), "{applied:?}");
    }
    assert_eq!(applied[1].saga_id, still);
    assert_eq!(applied[1].verdict, Verdict::Applied, "{applied:?}");
    assert_eq!(applied[1].outbox.len(), 1, "the shipment: {applied:?}");

    let charged = |e: &Event| matches!(e, Event::Succeeded { step: 1, .. });
    let shipped = |e: &Event| matches!(e, Event::Dispatched { step: 2, .. });
    assert_eq!(count(&a, moved, charged).await, 1);
    assert_eq!(count(&a, moved, shipped).await, 1);
    assert_eq!(count(&a, still, charged).await, 1);
    assert_eq!(count(&a, still, shipped).await, 1);
    // Both sagas go on from what A now keeps.
    for id in [moved, still] {
        let applied = a
            .apply(&registry, vec![answer_last(&a, id).await])
            .await
            .unwrap();
        assert_eq!(
            applied[0].status,
            Some(SagaStatus::Completed),
            "{applied:?}"
        );
    }
    db.drop_schema().await;
}

#[tokio::test]
async fn a_moved_on_saga_whose_log_fails_is_deferred_and_the_rest_of_its_batch_commits() {
    let TwoWriters {
        db,
        a,
        b,
        registry,
        moved,
        still,
    } = two_writers().await;
    // B moves `moved` on, then its log loses an event: A's kept state fails the write's
    // check, and applying it again from the log fails.
    let charge = answer_last(&b, moved).await;
    b.apply(&registry, vec![charge.clone()]).await.unwrap();
    delete_last_event(&db, moved).await;

    let applied = a
        .apply(
            &registry,
            vec![charge.clone(), answer_last(&a, still).await],
        )
        .await
        .expect("the batch is reported, not failed");
    assert!(
        matches!(applied[0].verdict, Verdict::Deferred(_)),
        "handed back: {applied:?}"
    );
    assert!(applied[0].outbox.is_empty(), "{applied:?}");
    assert_eq!(applied[1].verdict, Verdict::Applied, "{applied:?}");
    assert_eq!(applied[1].outbox.len(), 1, "the shipment: {applied:?}");
    let shipped = |e: &Event| matches!(e, Event::Dispatched { step: 2, .. });
    assert_eq!(count(&a, still, shipped).await, 1, "committed");
    // A no longer keeps `moved`: the next try reads the log and fails for good.
    let err = a
        .apply(&registry, vec![charge])
        .await
        .expect_err("the log is miscounted");
    assert_miscounted(&err);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_log_missing_an_event_its_row_counts_is_not_appended_to() {
    let db = database().await;
    let def = order::definition();
    let mut registry = Registry::new();
    registry.register(&def);
    let store = db.store();
    let id = Client::new(Arc::new(store.clone()))
        .start(&def, &Order::default())
        .await
        .unwrap()
        .saga_id;
    let answer = answer_last(&store, id).await;
    // The log's last event (the reservation's dispatch) is deleted around the store.
    delete_last_event(&db, id).await;
    // A store with nothing kept reads the log: it still replays, but appending after it would
    // number the next events as ones the row already counts.
    let err = db
        .store()
        .apply(&registry, vec![answer])
        .await
        .expect_err("a log shorter than its row");
    assert_miscounted(&err);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_saga_started_beside_a_running_orchestrator_is_kept_for_its_first_result() {
    let db = database().await;
    let def = order::definition();
    let mut registry = Registry::new();
    registry.register(&def);
    // The orchestrator's store, with its relay attached as a running orchestrator does.
    let store = db.store();
    let (relay, _handed) = tokio::sync::mpsc::unbounded_channel();
    store.attach_relay(LocalRelay::new(relay));
    let beside = Client::new(Arc::new(store.clone()))
        .start(&def, &Order::default())
        .await
        .unwrap()
        .saga_id;
    // Another service's store: its start leaves nothing in the orchestrator's memory.
    let elsewhere = Client::new(Arc::new(db.store()))
        .start(&def, &Order::default())
        .await
        .unwrap()
        .saga_id;
    let answers = [
        answer_last(&store, beside).await,
        answer_last(&store, elsewhere).await,
    ];
    // Both logs gone: only a state kept in memory can still apply a result.
    let sql = format!(
        "DELETE FROM \"{}\".events WHERE saga_id = ANY($1)",
        db.schema
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(vec![beside, elsewhere])
        .execute(&db.pool)
        .await
        .unwrap();

    let [kept, read] = answers;
    let applied = store.apply(&registry, vec![kept]).await.unwrap();
    assert_eq!(verdict(&applied), &Verdict::Applied, "{applied:?}");
    // As a replay would have it: the reservation done, the charge dispatched.
    assert_eq!(applied[0].status, Some(SagaStatus::Running));
    let next: Vec<Command> = applied[0]
        .outbox
        .iter()
        .map(|r| Command::from_message(&r.envelope.message).unwrap())
        .collect();
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!((next[0].step, next[0].attempt), (1, 1), "{next:?}");
    // A saga started elsewhere is read from its log, which no longer starts.
    let err = store
        .apply(&registry, vec![read])
        .await
        .expect_err("an empty log does not replay");
    assert!(err.to_string().contains("SAGA-R001"), "{err}");
    db.drop_schema().await;
}

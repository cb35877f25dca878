//! The testing kit with the examples' real workers and their inboxes in PostgreSQL: the saga's
//! log, the broker and the clock are the kit's, the handlers' transactions are real.

use std::time::Duration;

use saga_core::SagaStatus;
use saga_core::testing::{Fault, TestEnv};
use saga_examples::Example;
use saga_examples::order::OrderSaga;
use saga_examples::participant::{self, Ledger};
use uuid::Uuid;

const SERVICES: [&str; 3] = ["inventory", "payment", "shipping"];

#[test]
fn the_order_saga_runs_its_real_handlers_with_their_inbox_on_the_test_kit() {
    let mut env = TestEnv::new();
    // The pools live on the env's runtime, where the handlers run.
    let db = env.block_on(saga_tests::fresh_database());
    let pool = db.pool.clone();
    let ledgers = env.block_on(async move {
        participant::migrate(&pool, &SERVICES)
            .await
            .expect("the examples' tables");
        SERVICES.map(|service| Ledger::pg(pool.clone(), service).expect("a valid schema"))
    });
    let saga = OrderSaga::definition();
    env.register(&saga);
    for (service, ledger) in SERVICES.iter().zip(&ledgers) {
        env.worker(&participant::worker::<OrderSaga>(service, ledger));
    }

    let shipped = env.start(&saga, &OrderSaga::input(1, false));
    let refused = env.start(&saga, &OrderSaga::input(2, true));
    // The charge applies but its answer is lost: the retry is answered by the inbox.
    env.inject("payment", "charge", Fault::LoseResult);
    let retried = env.start(&saga, &OrderSaga::input(3, false));
    assert_eq!(env.status(retried), SagaStatus::Running);
    env.advance(Duration::from_secs(600));

    assert_eq!(env.status(shipped), SagaStatus::Completed);
    assert_eq!(env.status(refused), SagaStatus::Compensated);
    assert_eq!(env.status(retried), SagaStatus::Completed);
    let charges = env
        .commands(retried)
        .iter()
        .filter(|c| *c == "payment.charge")
        .count();
    assert!(
        charges >= 2,
        "the charge was sent again: {:?}",
        env.commands(retried)
    );

    let pool = db.pool.clone();
    let effects = move |saga: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT action FROM example_effects WHERE saga_id = $1 ORDER BY id",
            )
            .bind(saga)
            .fetch_all(&pool)
            .await
            .expect("read the effects")
        }
    };
    assert_eq!(
        env.block_on(effects(shipped)),
        ["reserve", "charge", "ship"]
    );
    assert_eq!(
        env.block_on(effects(refused)),
        ["reserve", "charge", "refund", "release"]
    );
    assert_eq!(
        env.block_on(effects(retried)),
        ["reserve", "charge", "ship"]
    );

    let pool = db.pool.clone();
    let recorded = env.block_on(async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM payment.inbox WHERE saga_id = $1 AND outcome IS NOT NULL",
        )
        .bind(retried)
        .fetch_one(&pool)
        .await
        .expect("read the payment inbox")
    });
    assert_eq!(recorded, 1, "the charge's outcome is recorded once");
    drop(ledgers);
    env.block_on(db.drop_database());
}

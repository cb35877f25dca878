//! The plain example (`plain-saga`, the program to copy) on the real PostgreSQL and RabbitMQ:
//! it places its orders and prints how each ended, and placing them again changes nothing.

use saga_tests::process::Stack;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_example_places_its_orders_once() {
    let stack = Stack::new("plain-saga").await;
    let expected = "order 1: completed, tracking t-1\n\
                    order 2: completed, tracking t-2\n\
                    order 3: compensated: step `ship` forward failed: no address to ship to\n\
                    order 4: completed, tracking t-4\n\
                    order 5: completed, tracking t-5\n\
                    order 6: compensated: step `ship` forward failed: no address to ship to\n";
    assert_eq!(stack.run(&["6"]).await, expected);
    // Again: the same orders (their business keys), nothing applied twice.
    assert_eq!(stack.run(&["6"]).await, expected);
    let counts: (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM warehouse.reservations), \
         (SELECT count(*) FROM warehouse.reservations WHERE released), \
         (SELECT count(*) FROM warehouse.shipments), \
         (SELECT count(*) FROM payments.charges), \
         (SELECT count(*) FROM payments.charges WHERE refunded)",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(counts, (6, 2, 4, 6, 2));
    stack.shutdown().await;
}

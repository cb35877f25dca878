//! A RabbitMQ cluster of three nodes of the test's own (their own names, ports and data
//! directories, joined with `rabbitmqctl join_cluster`), with `order-saga` as processes given
//! all three nodes in `AMQP_URL`: sagas run on while the node leading `saga.results` is killed
//! and restarted, and then the node leading a service's queue is stopped. Every saga finishes
//! with exactly the effects it requires.
//!
//! The shared broker is left alone, but three nodes take the machine: nextest runs this alone
//! (`.config/nextest.toml`).

use std::time::Duration;

use saga_tests::free_port;
use saga_tests::invariants::{assert_all_ended, finished};
use saga_tests::process::Stack;
use saga_tests::rabbit_node::{Node, TempDir};
use saga_tests::wait_until;

const SERVICES: [&str; 3] = ["inventory", "payment", "shipping"];
const SAGAS: i64 = 1000;

/// Three nodes, each booted alone; the second and third then join the first with
/// `rabbitmqctl join_cluster` (after `stop_app`, and `start_app` again).
async fn cluster() -> Vec<Node> {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let boot = |i: usize| async move {
        let port = free_port();
        // guest may connect over 127.0.0.1 only, which is where the test connects.
        let config = format!("listeners.tcp.default = 127.0.0.1:{port}\n");
        let name = format!("saga_c{id}_{i}");
        Node::start(&name, TempDir::new("saga-cluster"), &config, port).await
    };
    let (first, second, third) = tokio::join!(boot(0), boot(1), boot(2));
    let nodes = vec![first, second, third];
    for joining in &nodes[1..] {
        joining.ctl(&["stop_app"]);
        joining.ctl(&["join_cluster", &nodes[0].name]);
        joining.ctl(&["start_app"]);
    }
    let status = nodes[0].ctl(&["cluster_status", "--formatter", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).expect("cluster_status as JSON");
    let running = status["running_nodes"].as_array().map_or(0, Vec::len);
    assert_eq!(running, 3, "three nodes run as one cluster: {status}");
    nodes
}

/// The node that leads `queue` (asked of a node that runs), by its index.
fn leader(nodes: &[Node], asked: usize, queue: &str) -> usize {
    let listing = nodes[asked].ctl(&["list_queues", "-q", "--no-table-headers", "name", "leader"]);
    let leader = listing
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .find(|(name, _)| *name == queue)
        .map(|(_, leader)| leader.trim().to_owned())
        .unwrap_or_else(|| panic!("no leader of {queue} in {listing}"));
    nodes
        .iter()
        .position(|n| n.name == leader)
        .unwrap_or_else(|| panic!("{leader} is none of the cluster's nodes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_finish_while_queue_leaders_are_killed_and_stopped() {
    let mut nodes = cluster().await;
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", n.port))
        .collect();
    let urls = urls.join(",");
    let env = [("AMQP_URL", urls.as_str()), ("AMQP_QUORUM_GROUP_SIZE", "3")];
    let mut stack = Stack::new("order-saga").await;
    stack.run_with(&["migrate"], &env).await;
    // Each program logs to a file of its own, kept if the test fails.
    let logs = std::env::temp_dir().join(format!(
        "saga-cluster-logs-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&logs).unwrap();
    eprintln!("the programs' logs: {}", logs.display());
    let logged = [("RUST_LOG", "info"), env[0], env[1]];
    stack.spawn_logged(&["orchestrator"], &logged, &logs.join("orchestrator.log"));
    let mut payment_service = 0;
    for service in SERVICES {
        let pid = stack.spawn_logged(
            &["service", service],
            &logged,
            &logs.join(format!("{service}.log")),
        );
        if service == "payment" {
            payment_service = pid;
        }
    }
    // Every queue is declared and replicated on the three nodes before any fault. The
    // leaders are found before each wave starts, so each fault lands within milliseconds of
    // the sagas it waits for (a `rabbitmqctl` call takes about a second, as long as a wave
    // may take to finish on a fast machine).
    let declared = wait_until(Duration::from_secs(60), || async {
        let members = nodes[0].ctl(&["list_queues", "-q", "--no-table-headers", "name", "members"]);
        let ours: Vec<&str> = members.lines().filter(|l| l.contains("saga.")).collect();
        ours.iter().any(|l| l.starts_with("saga.results"))
            && SERVICES.iter().all(|s| {
                ours.iter()
                    .any(|l| l.starts_with(&format!("saga.service.{s}")))
            })
            && ours.iter().all(|l| l.matches('@').count() == 3)
    })
    .await;
    assert!(
        declared,
        "the queues are replicated on three nodes: {}",
        queues(&nodes[0])
    );

    // Two waves of half the sagas each: one meets the kill, the other the stop.
    let half = (SAGAS / 2).to_string();
    let wave = ["start", "--count", half.as_str(), "--fail-every", "10"];

    // The node leading the results queue dies without a goodbye, and later comes back.
    let results = leader(&nodes, 0, "saga.results");
    let alive = (results + 1) % nodes.len();
    let starter = stack.spawn_with(&wave, &env);
    assert!(
        finished_at_least(&stack, SAGAS / 50).await,
        "sagas finish on the cluster"
    );
    nodes[results].kill();
    let before = finished(&stack).await;
    assert!(
        before < SAGAS / 2,
        "the node died mid-wave ({before} finished)"
    );
    assert!(
        finished_at_least(&stack, SAGAS / 2).await,
        "the first wave finishes without the node: {}",
        queues(&nodes[alive])
    );
    assert!(
        stack.wait_exit(starter, Duration::from_secs(120)).await,
        "the first wave was started"
    );
    nodes[results].boot().await;

    // The node leading the payment queue is stopped (gracefully) mid-run and stays down.
    let payment = leader(&nodes, alive, "saga.service.payment");
    let starter = stack.spawn_with(&wave, &env);
    assert!(
        finished_at_least(&stack, SAGAS / 2 + SAGAS / 50).await,
        "the second wave runs: {}",
        queues(&nodes[alive])
    );
    // The payment service holds still while its queue's leader stops (well within the 30 s
    // step timeout): charges wait in the queue through the stop, and sagas are mid-run
    // whatever the machine's speed.
    stack.signal(payment_service, "STOP");
    nodes[payment].ctl(&["stop_app"]);
    let at_stop = finished(&stack).await;
    stack.signal(payment_service, "CONT");
    assert!(at_stop < SAGAS, "sagas were running when the node stopped");
    assert!(
        stack.wait_exit(starter, Duration::from_secs(120)).await,
        "the second wave was started"
    );
    assert_all_ended(&stack, &env, 240, SAGAS, 10).await;
    stack.shutdown().await;
    let _ = std::fs::remove_dir_all(&logs);
}

/// The queues as a node sees them, for a failure's message.
fn queues(node: &Node) -> String {
    node.ctl(&[
        "list_queues",
        "-q",
        "name",
        "type",
        "leader",
        "online",
        "messages",
    ])
}

async fn finished_at_least(stack: &Stack, n: i64) -> bool {
    wait_until(Duration::from_secs(120), || async {
        finished(stack).await >= n
    })
    .await
}

//! The web console (`saga ui`) in a real browser (headless Chromium over WebDriver), on sagas
//! run by an orchestrator and a participant on the real PostgreSQL and RabbitMQ.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use saga_core::worker::{StepError, Worker, handler_fn};
use saga_core::{Client, CommandContext, Orchestrator, RetryPolicy, SagaDefinition, SagaStatus};
use saga_tests::amqp::broker;
use saga_tests::browser::{Browser, http};
use saga_tests::console::Console;
use saga_tests::harness::config;
use saga_tests::{TestDb, database, wait_until};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// reserve (undo: release, one attempt) -> charge (pivot), which fails when the input says.
fn definition() -> SagaDefinition<Value> {
    SagaDefinition::<Value>::builder("checkout", 1)
        .step("reserve", |s| {
            s.action("stock", "reserve", |c| Ok(c.input().clone()))
                .compensation("stock", "release", |c| Ok(c.input().clone()))
                .compensation_retry(RetryPolicy::no_retry())
        })
        .step("charge", |s| {
            s.pivot()
                .action("stock", "charge", |c| Ok(c.input().clone()))
        })
        .build()
        .unwrap()
}

/// reserve -> waits for `approval` -> charge (pivot).
fn gated() -> SagaDefinition<Value> {
    SagaDefinition::<Value>::builder("approval", 1)
        .step("reserve", |s| {
            s.action("stock", "reserve", |c| Ok(c.input().clone()))
                .compensation("stock", "release", |c| Ok(c.input().clone()))
        })
        .step("approval", |s| {
            s.wait_for::<Value>("approved", |v| match v["by"].as_str() {
                Some(_) => Ok(()),
                None => Err("an approval names its approver".into()),
            })
        })
        .step("charge", |s| {
            s.pivot()
                .action("stock", "charge", |c| Ok(c.input().clone()))
        })
        .build()
        .unwrap()
}

/// An orchestrator and the `stock` service on a vhost of the test's own; the release fails
/// for good while `release_down` holds; the charge fails with the input's `fail` as reason.
struct Services {
    client: Client,
    release_down: Arc<AtomicBool>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<saga_core::Result<()>>>,
    broker: saga_tests::amqp::Broker,
}

async fn services(db: &TestDb) -> Services {
    let broker = broker().await;
    let store = Arc::new(db.store());
    let shutdown = CancellationToken::new();
    let release_down = Arc::new(AtomicBool::new(true));
    let down = Arc::clone(&release_down);
    let worker = Worker::builder("stock", db.inbox().await)
        .handler(
            "reserve",
            handler_fn(|v: Value, _: CommandContext| async move { Ok::<_, StepError>(v) }),
        )
        .handler(
            "release",
            handler_fn(move |v: Value, _: CommandContext| {
                let down = down.load(Ordering::SeqCst);
                async move {
                    if down {
                        Err(StepError::terminal("warehouse API down"))
                    } else {
                        Ok(v)
                    }
                }
            }),
        )
        .handler(
            "charge",
            handler_fn(|v: Value, _: CommandContext| async move {
                match v["fail"].as_str() {
                    Some(reason) => Err(StepError::terminal(reason.to_owned())),
                    None => Ok(v),
                }
            }),
        )
        .build();
    let tasks = vec![
        tokio::spawn(worker.run(Arc::new(broker.transport().await), shutdown.clone())),
        tokio::spawn(
            Orchestrator::builder(store.clone(), Arc::new(broker.transport().await))
                .register(&definition())
                .register(&gated())
                .config(config())
                .build()
                .run(shutdown.clone()),
        ),
    ];
    Services {
        client: Client::new(store),
        release_down,
        shutdown,
        tasks,
        broker,
    }
}

impl Services {
    async fn start(&self, input: Value, key: Option<&str>) -> Uuid {
        match key {
            Some(key) => self.client.start_with_key(&definition(), &input, key).await,
            None => self.client.start(&definition(), &input).await,
        }
        .unwrap()
        .saga_id
    }

    async fn settle(&self, id: Uuid, want: SagaStatus) {
        let client = &self.client;
        let reached = wait_until(Duration::from_secs(20), || async {
            client.summary(id).await.unwrap().unwrap().status == want
        })
        .await;
        assert!(reached, "{id} to be {want}");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await.unwrap().unwrap();
        }
        self.broker.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_a_stuck_saga_reads_its_timeline_and_retries_it() {
    let db = database().await;
    let services = services(&db).await;
    let done = services.start(json!({"sku": "A-1"}), None).await;
    let stuck = services
        .start(
            json!({"sku": "B-2", "fail": "card declined"}),
            Some("order-1042"),
        )
        .await;
    services.settle(done, SagaStatus::Completed).await;
    services.settle(stuck, SagaStatus::Stuck).await;

    let console = Console::start(&db.schema, "127.0.0.1:0", &[], &[]).await;
    let browser = Browser::start().await;

    // The overview counts them by name and status and lists the stuck one with its reason.
    browser.goto(&console.base()).await;
    let counts = browser.find("#counts").await.text().await;
    assert!(counts.contains("checkout"), "{counts}");
    let overview = browser.find("main").await.text().await;
    assert!(overview.contains("warehouse API down"), "{overview}");

    // Filter the list to stuck ones: only that saga; open it.
    browser
        .find("nav a[href='/sagas?status=stuck']")
        .await
        .click()
        .await;
    browser.wait_url("/sagas?status=stuck").await;
    let rows = browser.all("table.sagas td.id a").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].text().await, stuck.to_string());
    rows[0].click().await;
    browser.wait_url(&format!("/sagas/{stuck}")).await;
    assert_eq!(browser.wait_text("#status").await, "stuck");

    // The timeline names its steps and service, and draws each attempt by outcome.
    let mut labels = Vec::new();
    for label in browser.all("svg.timeline text.step").await {
        labels.push(label.text().await);
    }
    assert_eq!(labels, ["reserve", "charge"]);
    let bars: Vec<String> = serde_json::from_value(
        browser
            .run(
                "return Array.from(document.querySelectorAll('svg.timeline rect.bar'))\
                 .map(b => b.dataset.step + ' ' + b.dataset.direction + ' ' + b.getAttribute('class'))",
            )
            .await,
    )
    .unwrap();
    assert_eq!(
        bars,
        [
            "reserve forward bar ok",
            "charge forward bar failed",
            "reserve compensation bar failed"
        ]
    );

    // The fault is cleared; retry from the page: the saga finishes, compensated, and the
    // log has the retry as the CLI records it.
    services.release_down.store(false, Ordering::SeqCst);
    browser.find("button[value=retry]").await.click().await;
    let flash = browser.wait_text("#flash").await;
    assert_eq!(flash, "retrying its failed step");
    // The page refreshes itself while the saga may change: it comes to show it finished.
    let finished = wait_until(Duration::from_secs(30), || async {
        browser.text_of("#status").await.as_deref() == Some("compensated")
    })
    .await;
    assert!(finished, "the page shows the saga compensated, by itself");
    let kinds: Vec<&str> = services
        .client
        .history(stuck)
        .await
        .unwrap()
        .iter()
        .map(|r| r.event.kind())
        .collect();
    assert!(kinds.contains(&"retry_requested"), "{kinds:?}");
    assert_eq!(
        browser.all("svg.timeline rect.bar.compensated").await.len(),
        1
    );
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"));
    let target = std::env::var("SAGA_UPDATE_SCREENSHOTS").map_or_else(
        |_| std::env::temp_dir().join("saga-console-saga.png"),
        |_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../docs/images/console-saga.png"
            )
            .into()
        },
    );
    std::fs::write(&target, &png).unwrap();

    // The API serves the same as the CLI's --json.
    let api = http(
        &console.addr,
        "GET",
        &format!("/api/sagas/{stuck}"),
        &[],
        b"",
    )
    .await;
    let shown: Value = serde_json::from_slice(&api.body).unwrap();
    assert_eq!(shown["saga"]["status"], "compensated");
    assert_eq!(shown["saga"]["business_key"], "order-1042");
    let listed = http(&console.addr, "GET", "/api/sagas?key=order-1042", &[], b"").await;
    let listed: Vec<Value> = serde_json::from_slice(&listed.body).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], stuck.to_string());

    drop(browser);
    drop(console);
    services.stop().await;
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_log_holds_shows_as_text_and_actions_need_the_token_off_loopback() {
    let db = database().await;
    let services = services(&db).await;
    let script = "<script>window.pwned = 1</script>";
    let id = services
        .start(
            json!({"sku": "<img src=x onerror=\"window.pwned = 2\">", "fail": script}),
            Some("<b>key</b>"),
        )
        .await;
    services.settle(id, SagaStatus::Stuck).await;

    // In the browser: the reason reads as the text it is, and nothing of it ran.
    let console = Console::start(&db.schema, "127.0.0.1:0", &[], &[]).await;
    let browser = Browser::start().await;
    browser
        .goto(&format!("{}/sagas/{id}", console.base()))
        .await;
    let events = browser.find("#events").await.text().await;
    assert!(events.contains(script), "{events}");
    assert!(
        browser
            .find("#input")
            .await
            .text()
            .await
            .contains("<img src=x")
    );
    assert_eq!(
        browser.run("return window.pwned === undefined").await,
        json!(true)
    );
    browser
        .goto(&format!(
            "{}/sagas?key=%3Cb%3Ekey%3C%2Fb%3E",
            console.base()
        ))
        .await;
    assert_eq!(browser.all("table.sagas td.id a").await.len(), 1);
    assert_eq!(
        browser.run("return window.pwned === undefined").await,
        json!(true)
    );
    drop(browser);

    // On loopback: a form without the page's CSRF secret, or a Host of another name (DNS
    // rebinding), is refused.
    let form = "csrf=guess";
    let refused = http(
        &console.addr,
        "POST",
        &format!("/sagas/{id}/retry"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        form.as_bytes(),
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(refused.text().contains("CSRF"));
    let rebound = http(
        &console.addr,
        "GET",
        "/",
        &[("Host", "evil.example:8080")],
        b"",
    )
    .await;
    assert_eq!(rebound.status, 403);
    drop(console);

    // Off loopback with a token: the page offers no action without it, and an action without
    // it is refused; with it, it is done.
    let guarded = Console::start(
        &db.schema,
        "0.0.0.0:0",
        &[],
        &[("SAGA_UI_TOKEN", "s3cret-token")],
    )
    .await;
    let port = guarded.addr.rsplit_once(':').unwrap().1;
    let addr = format!("127.0.0.1:{port}");
    // Without the token, pages send to the login form and the API answers 401.
    let page = http(&addr, "GET", &format!("/sagas/{id}"), &[], b"").await;
    assert_eq!(page.status, 303);
    assert_eq!(
        page.header("location"),
        Some(format!("/login?next=%2Fsagas%2F{id}").as_str())
    );
    let api = http(&addr, "GET", "/api/sagas", &[], b"").await;
    assert_eq!(api.status, 401, "{}", api.text());
    let login_page = http(&addr, "GET", "/login", &[], b"").await;
    assert_eq!(login_page.header("x-frame-options"), Some("DENY"));
    assert!(
        login_page
            .header("content-security-policy")
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let csrf = csrf_of(&login_page.text());
    let form = format!("csrf={csrf}");
    let form_headers = [("Content-Type", "application/x-www-form-urlencoded")];
    let without = http(
        &addr,
        "POST",
        &format!("/sagas/{id}/retry"),
        &form_headers,
        form.as_bytes(),
    )
    .await;
    assert_eq!(without.status, 403, "{}", without.text());
    assert!(without.text().contains("token"));
    let wrong = [form_headers[0], ("Authorization", "Bearer guess")];
    let wrong = http(
        &addr,
        "POST",
        &format!("/sagas/{id}/retry"),
        &wrong,
        form.as_bytes(),
    )
    .await;
    assert_eq!(wrong.status, 403);
    let retries = || async {
        services
            .client
            .history(id)
            .await
            .unwrap()
            .iter()
            .filter(|r| r.event.kind() == "retry_requested")
            .count()
    };
    assert_eq!(retries().await, 0, "nothing was done without the token");
    let login = format!("csrf={csrf}&token=s3cret-token&next=%2Fsagas%2F{id}");
    let logged = http(&addr, "POST", "/login", &form_headers, login.as_bytes()).await;
    assert_eq!(logged.status, 303, "{}", logged.text());
    let cookie = logged.header("set-cookie").expect("the token's cookie");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    assert!(
        !cookie.contains("s3cret-token"),
        "the cookie holds a digest: {cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let page = http(
        &addr,
        "GET",
        &format!("/sagas/{id}"),
        &[("Cookie", cookie.as_str())],
        b"",
    )
    .await;
    assert!(
        page.text().contains("retry the failed step"),
        "{}",
        page.text()
    );
    let with = [form_headers[0], ("Cookie", cookie.as_str())];
    let done = http(
        &addr,
        "POST",
        &format!("/sagas/{id}/retry"),
        &with,
        form.as_bytes(),
    )
    .await;
    assert_eq!(done.status, 303, "{}", done.text());
    assert_eq!(retries().await, 1);
    drop(guarded);

    // Off loopback without a token, and --read-only: no action at all.
    for (listen, extra) in [
        ("0.0.0.0:0", &[][..]),
        ("127.0.0.1:0", &["--read-only"][..]),
    ] {
        let console = Console::start(&db.schema, listen, extra, &[]).await;
        let port = console.addr.rsplit_once(':').unwrap().1;
        let addr = format!("127.0.0.1:{port}");
        let page = http(&addr, "GET", &format!("/sagas/{id}"), &[], b"")
            .await
            .text();
        assert!(
            page.contains("Actions are off") && !page.contains("<form class=\"action\""),
            "{page}"
        );
        let csrf = csrf_of(&http(&addr, "GET", "/login", &[], b"").await.text());
        let refused = http(
            &addr,
            "POST",
            &format!("/sagas/{id}/retry"),
            &form_headers,
            format!("csrf={csrf}").as_bytes(),
        )
        .await;
        assert_eq!(
            refused.status,
            403,
            "{listen} {extra:?}: {}",
            refused.text()
        );
    }
    assert_eq!(retries().await, 1);

    services.stop().await;
    db.drop_schema().await;
}

/// The CSRF secret in a page's forms.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a form") + 19;
    page[at..].split('"').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_pause_resume_signal_and_cancel_from_the_page_are_recorded_as_the_cli_records_them()
{
    let db = database().await;
    let services = services(&db).await;
    // A compensation that failed for good, to be resolved by hand.
    let by_hand = services
        .start(json!({"sku": "E-5", "fail": "card declined"}), None)
        .await;
    services.settle(by_hand, SagaStatus::Stuck).await;
    services.release_down.store(false, Ordering::SeqCst);
    let client = &services.client;
    let approved = client
        .start(&gated(), &json!({"sku": "C-3"}))
        .await
        .unwrap()
        .saga_id;
    let withdrawn = client
        .start(&gated(), &json!({"sku": "D-4"}))
        .await
        .unwrap()
        .saga_id;
    let waiting = |id: Uuid| async move {
        wait_until(Duration::from_secs(20), || async {
            kinds(client, id).await.contains(&"waiting")
        })
        .await
    };
    assert!(waiting(approved).await && waiting(withdrawn).await);

    let console = Console::start(&db.schema, "127.0.0.1:0", &[], &[]).await;
    let browser = Browser::start().await;

    // Resolve: the stuck compensation is recorded as done by hand, and the saga ends.
    browser
        .goto(&format!("{}/sagas/{by_hand}", console.base()))
        .await;
    browser
        .find("form[action$='/resolve'] input[name=reason]")
        .await
        .type_text("released in the warehouse UI")
        .await;
    browser.find("button[value=resolve]").await.click().await;
    assert_eq!(
        browser.wait_text("#flash").await,
        "compensation of `reserve` resolved by hand"
    );
    services.settle(by_hand, SagaStatus::Compensated).await;
    assert!(kinds(client, by_hand).await.contains(&"resolved"));

    let page = format!("{}/sagas/{approved}", console.base());
    browser.goto(&page).await;
    // Waiting: the wait's bar is drawn, and the actions of a running saga are offered.
    assert_eq!(browser.all("svg.timeline rect.bar.waiting").await.len(), 1);
    for action in ["cancel", "pause", "signal"] {
        browser.find(&format!("button[value={action}]")).await;
    }
    assert!(browser.all("button[value=retry]").await.is_empty());

    // Pause, then resume: each said on the page and recorded in the log.
    browser
        .find("form[action$='/pause'] input[name=reason]")
        .await
        .type_text("checking stock")
        .await;
    browser.find("button[value=pause]").await.click().await;
    assert_eq!(browser.wait_text("#flash").await, "paused");
    browser.goto(&page).await;
    browser.find("button[value=resume]").await.click().await;
    assert_eq!(browser.wait_text("#flash").await, "resumed");

    // A payload that is not JSON is refused, saying so; an approval is taken, and the saga
    // completes.
    browser.goto(&page).await;
    browser
        .find("form[action$='/signal'] input[name=name]")
        .await
        .type_text("approved")
        .await;
    let payload = browser
        .find("form[action$='/signal'] textarea[name=payload]")
        .await;
    browser
        .run("document.querySelector('textarea[name=payload]').value = ''")
        .await;
    payload.type_text("{not json").await;
    browser.find("button[value=signal]").await.click().await;
    let refused = browser.wait_text("p.flash.error").await;
    assert!(refused.contains("the payload is not JSON"), "{refused}");
    browser.goto(&page).await;
    browser
        .find("form[action$='/signal'] input[name=name]")
        .await
        .type_text("approved")
        .await;
    browser
        .run("document.querySelector('textarea[name=payload]').value = ''")
        .await;
    browser
        .find("form[action$='/signal'] textarea[name=payload]")
        .await
        .type_text(r#"{"by": "maria"}"#)
        .await;
    browser.find("button[value=signal]").await.click().await;
    assert_eq!(
        browser.wait_text("#flash").await,
        "signal `approved` recorded"
    );
    services.settle(approved, SagaStatus::Completed).await;

    // Cancel the other: it compensates and ends cancelled.
    browser
        .goto(&format!("{}/sagas/{withdrawn}", console.base()))
        .await;
    browser
        .find("form[action$='/cancel'] input[name=reason]")
        .await
        .type_text("customer withdrew")
        .await;
    browser.find("button[value=cancel]").await.click().await;
    assert_eq!(
        browser.wait_text("#flash").await,
        "cancel accepted; it compensates"
    );
    services.settle(withdrawn, SagaStatus::Cancelled).await;

    let approved_kinds = kinds(client, approved).await;
    for kind in ["paused", "resumed", "signal_received", "completed"] {
        assert!(
            approved_kinds.contains(&kind),
            "{kind} in {approved_kinds:?}"
        );
    }
    let cancelled = kinds(client, withdrawn).await;
    assert!(cancelled.contains(&"cancel_requested"), "{cancelled:?}");
    drop(browser);
    drop(console);
    services.stop().await;
    db.drop_schema().await;
}

async fn kinds(client: &Client, id: Uuid) -> Vec<&'static str> {
    client
        .history(id)
        .await
        .unwrap()
        .iter()
        .map(|r| r.event.kind())
        .collect()
}

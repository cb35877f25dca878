//! What can be checked of `docker/` without a Docker engine: the compose file parses, its
//! services and environment match what the example programs read, and the Dockerfile builds
//! the programs the compose file runs.

use std::path::Path;

use saga_amqp::AmqpConfig;
use saga_examples::cli::check_args;
use saga_examples::order::OrderSaga;
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

fn compose() -> Yaml {
    let text =
        std::fs::read_to_string(root().join("docker/compose.yaml")).expect("read compose.yaml");
    YamlLoader::load_from_str(&text)
        .expect("compose.yaml parses")
        .remove(0)
}

/// A service's mapping with `<<` merge keys applied (YAML 1.1 merges, as Compose does).
fn merged(service: &Yaml) -> yaml_rust2::yaml::Hash {
    let mut out = yaml_rust2::yaml::Hash::new();
    if let Some(base) = service["<<"].as_hash() {
        out.extend(base.clone());
    }
    for (k, v) in service.as_hash().expect("a service is a mapping") {
        if k.as_str() != Some("<<") {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

fn get<'a>(hash: &'a yaml_rust2::yaml::Hash, key: &str) -> &'a Yaml {
    hash.get(&Yaml::String(key.to_owned()))
        .unwrap_or(&Yaml::BadValue)
}

#[test]
fn compose_services_match_the_programs() {
    let doc = compose();
    let services = doc["services"].as_hash().expect("services");
    let names: Vec<&str> = services.keys().filter_map(Yaml::as_str).collect();
    for infra in ["postgres", "rabbitmq"] {
        assert!(names.contains(&infra), "service {infra}");
        assert!(
            !doc["services"][infra]["healthcheck"]["test"].is_badvalue(),
            "{infra} has a healthcheck"
        );
    }
    assert!(
        doc["services"]["rabbitmq"]["image"]
            .as_str()
            .unwrap()
            .contains("management")
    );
    let mut app_services = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let service = merged(service);
        if get(&service, "image").as_str() != Some("saga-examples") {
            continue;
        }
        app_services += 1;
        let command: Vec<&str> = get(&service, "command")
            .as_vec()
            .unwrap_or_else(|| panic!("{name} has a command list"))
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        check_args::<OrderSaga>(&command).unwrap_or_else(|e| panic!("{name}: {command:?}: {e}"));
        let env = get(&service, "environment");
        let database = env["DATABASE_URL"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} sets DATABASE_URL"));
        assert!(database.contains("@postgres:5432/"), "{name}: {database}");
        let amqp = env["AMQP_URL"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} sets AMQP_URL"))
            .to_owned();
        assert!(amqp.contains("@rabbitmq:5672/"), "{name}: {amqp}");
        AmqpConfig::from_lookup(|v| (v == "AMQP_URL").then(|| amqp.clone()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let depends = get(&service, "depends_on");
        if command[0] == "migrate" {
            assert_eq!(
                depends["postgres"]["condition"].as_str(),
                Some("service_healthy")
            );
        } else {
            assert_eq!(
                depends["migrate"]["condition"].as_str(),
                Some("service_completed_successfully"),
                "{name}"
            );
            assert_eq!(
                depends["rabbitmq"]["condition"].as_str(),
                Some("service_healthy"),
                "{name}"
            );
        }
    }
    assert!(
        app_services >= 5,
        "migrate, orchestrator and the three services"
    );
    for service in ["inventory", "payment", "shipping"] {
        assert!(names.contains(&service), "a {service} service");
    }
    // The credentials the apps use are the ones the infrastructure is set up with.
    let pg = &doc["services"]["postgres"]["environment"];
    let mq = &doc["services"]["rabbitmq"]["environment"];
    let env = &doc["x-saga-env"];
    let expected_db = format!(
        "postgres://{}:{}@postgres:5432/{}",
        pg["POSTGRES_USER"].as_str().unwrap(),
        pg["POSTGRES_PASSWORD"].as_str().unwrap(),
        pg["POSTGRES_DB"].as_str().unwrap()
    );
    assert_eq!(env["DATABASE_URL"].as_str(), Some(expected_db.as_str()));
    let expected_mq = format!(
        "amqp://{}:{}@rabbitmq:5672/%2f",
        mq["RABBITMQ_DEFAULT_USER"].as_str().unwrap(),
        mq["RABBITMQ_DEFAULT_PASS"].as_str().unwrap()
    );
    assert_eq!(env["AMQP_URL"].as_str(), Some(expected_mq.as_str()));
}

#[test]
fn the_dockerfile_builds_the_programs_compose_runs() {
    let dockerfile =
        std::fs::read_to_string(root().join("docker/Dockerfile")).expect("read Dockerfile");
    let manifest = std::fs::read_to_string(root().join("examples/Cargo.toml"))
        .expect("read examples/Cargo.toml");
    for program in ["order-saga", "payment-saga", "travel-saga"] {
        assert!(
            manifest.contains(&format!("name = \"{program}\"")),
            "{program} is a binary"
        );
        assert!(
            dockerfile.contains(&format!("/target/release/{program}")),
            "the image has {program}"
        );
    }
    assert!(dockerfile.contains(r#"ENTRYPOINT ["order-saga"]"#));
    assert!(dockerfile.contains("cargo build --release --locked -p saga-examples --bins"));
}

use super::*;

fn parse(url: &str) -> PgHosts {
    url.parse().unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn addresses(hosts: &PgHosts) -> Vec<String> {
    hosts.hosts().iter().map(address).collect()
}

#[test]
fn one_host_is_parsed_by_sqlx_as_before() {
    let hosts = parse("postgres://app:secret@db:6543/orders?sslmode=disable");
    assert_eq!(addresses(&hosts), ["db:6543"]);
    assert_eq!(hosts.target(), Target::Any);
    assert_eq!(hosts.hosts()[0].get_database(), Some("orders"));
}

#[test]
fn several_hosts_share_the_rest_of_the_url_and_default_to_port_5432() {
    let hosts = parse(
        "postgres://app:p%40ss@db-a,db-b:5433,[::1]:5434/orders?application_name=x&target_session_attrs=read-write",
    );
    assert_eq!(addresses(&hosts), ["db-a:5432", "db-b:5433", "[::1]:5434"]);
    assert_eq!(hosts.target(), Target::ReadWrite);
    for host in hosts.hosts() {
        assert_eq!(host.get_database(), Some("orders"));
        assert_eq!(host.get_username(), "app");
        assert_eq!(host.get_application_name(), Some("x"));
    }
}

#[test]
fn a_comma_in_the_password_is_not_a_host_list() {
    let hosts = parse("postgres://app:a,b@db:5432/orders");
    assert_eq!(addresses(&hosts), ["db:5432"]);
}

#[test]
fn target_session_attrs_takes_what_a_store_can_use() {
    assert_eq!(
        parse("postgres://db/x?target_session_attrs=primary").target(),
        Target::Primary
    );
    assert_eq!(
        parse("postgres://db/x?target_session_attrs=any").target(),
        Target::Any
    );
    let refused = "postgres://a,b/x?target_session_attrs=standby"
        .parse::<PgHosts>()
        .unwrap_err();
    assert!(refused.to_string().contains("read-write"), "{refused}");
}

#[test]
fn a_bad_host_in_a_list_is_named() {
    let error = "postgres://a:1,b:port/x".parse::<PgHosts>().unwrap_err();
    assert!(error.to_string().contains("`b:port`"), "{error}");
    let error = "postgres://a:1,/x".parse::<PgHosts>().unwrap_err();
    assert!(error.to_string().contains("host[:port]"), "{error}");
}

#[test]
fn names_can_be_given_to_every_host() {
    let hosts = parse("postgres://a,b/x").map(|h| h.application_name("orchestrator"));
    assert!(
        hosts
            .hosts()
            .iter()
            .all(|h| h.get_application_name() == Some("orchestrator"))
    );
}

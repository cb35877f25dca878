use super::*;

fn parse(url: &str) -> PgHosts {
    url.parse().unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn refused(url: &str) -> String {
    url.parse::<PgHosts>().unwrap_err().to_string()
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
fn several_hosts_share_the_rest_of_the_url() {
    let hosts = parse(
        "postgres://app:p%40ss@db-a:5432,db-b:5433,[::1]:5434/orders?application_name=x&target_session_attrs=primary",
    );
    assert_eq!(addresses(&hosts), ["db-a:5432", "db-b:5433", "[::1]:5434"]);
    assert_eq!(hosts.target(), Target::Primary);
    for host in hosts.hosts() {
        assert_eq!(host.get_database(), Some("orders"));
        assert_eq!(host.get_username(), "app");
        assert_eq!(host.get_application_name(), Some("x"));
    }
}

#[test]
fn several_hosts_want_a_read_write_session_unless_told_primary() {
    assert_eq!(parse("postgres://a,b/x").target(), Target::ReadWrite);
    let any = refused("postgres://a,b/x?target_session_attrs=any");
    assert!(any.contains("several hosts"), "{any}");
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
    let standby = refused("postgres://a,b/x?target_session_attrs=standby");
    assert!(standby.contains("read-write"), "{standby}");
}

#[test]
fn a_bad_host_in_a_list_is_named() {
    let error = refused("postgres://a:1,b:port/x");
    assert!(error.contains("`b:port`"), "{error}");
    let error = refused("postgres://a:1,/x");
    assert!(error.contains("empty host"), "{error}");
}

#[test]
fn a_list_in_a_parameter_is_refused_saying_where_it_goes() {
    for url in [
        "postgres:///x?host=a,b",
        "postgres:///x?host=a%2Cb",
        "postgres://db/x?port=5432,5433",
    ] {
        let error = refused(url);
        assert!(error.contains("in the URL's authority"), "{url}: {error}");
    }
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

#[test]
fn debug_shows_the_hosts_never_the_password() {
    let hosts = parse("postgres://app:hunter2@db-a,db-b:5433/x");
    let shown = format!("{hosts:?}");
    assert!(
        shown.contains("db-a:5432") && shown.contains("db-b:5433"),
        "{shown}"
    );
    assert!(!shown.contains("hunter2"), "{shown}");
}

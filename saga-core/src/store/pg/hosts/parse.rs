//! Reading a `DATABASE_URL` of one host or several, and its `target_session_attrs`.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;

use super::{PgHosts, Target};

impl FromStr for PgHosts {
    type Err = sqlx::Error;

    fn from_str(url: &str) -> sqlx::Result<Self> {
        let (url, target) = take_target(url)?;
        let Some((head, hosts, tail)) = split_hosts(&url) else {
            let one: PgConnectOptions = url.parse()?;
            return Ok(PgHosts::new(vec![one], target.unwrap_or(Target::Any)));
        };
        if target == Some(Target::Any) {
            return Err(config(
                "target_session_attrs=any with several hosts: a saga store writes, so it takes \
                 read-write (the default with several hosts) or primary"
                    .to_owned(),
            ));
        }
        // Each host is parsed as a URL of its own (its name decoded, its port or PGPORT's).
        let parsed = hosts
            .split(',')
            .map(|host| {
                if host.is_empty() {
                    return Err(config(format!("an empty host in the list `{hosts}`")));
                }
                format!("{head}{host}{tail}")
                    .parse::<PgConnectOptions>()
                    .map_err(|e| config(format!("the host `{host}` of the list: {e}")))
            })
            .collect::<sqlx::Result<Vec<_>>>()?;
        Ok(PgHosts::new(parsed, target.unwrap_or(Target::ReadWrite)))
    }
}

fn config(message: String) -> sqlx::Error {
    sqlx::Error::Configuration(message.into())
}

/// The URL without its `target_session_attrs` parameter, and that parameter's target. A list
/// of hosts in a `host` or `hostaddr` parameter is refused (it belongs in the authority).
fn take_target(url: &str) -> sqlx::Result<(String, Option<Target>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let mut target = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("target_session_attrs", value)) => {
                target = Some(match value {
                    "any" => Target::Any,
                    "read-write" => Target::ReadWrite,
                    "primary" => Target::Primary,
                    other => {
                        return Err(config(format!(
                            "target_session_attrs={other} is not supported: a saga store \
                             writes, so it takes read-write, primary or (one host) any"
                        )));
                    }
                })
            }
            Some(("host" | "hostaddr" | "port", value))
                if value.contains(',') || value.contains("%2C") || value.contains("%2c") =>
            {
                return Err(config(format!(
                    "`{pair}`: list several hosts in the URL's authority \
                     (postgres://user@host1:5432,host2:5432/db), not in a parameter"
                )));
            }
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, target))
}

/// `(before the hosts, the hosts, after them)` when the URL's authority names several hosts.
fn split_hosts(url: &str) -> Option<(&str, &str, &str)> {
    let start = url.find("://")? + 3;
    let authority_len = url[start..]
        .find(['/', '?', '#'])
        .unwrap_or(url.len() - start);
    let authority = &url[start..start + authority_len];
    let hosts_at = start + authority.rfind('@').map_or(0, |at| at + 1);
    let hosts = &url[hosts_at..start + authority_len];
    hosts
        .contains(',')
        .then(|| (&url[..hosts_at], hosts, &url[start + authority_len..]))
}

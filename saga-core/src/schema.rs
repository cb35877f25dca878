//! Applying shipped migrations into a configurable PostgreSQL schema.

use sqlx::migrate::Migrator;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

use crate::error::{Error, Result};

/// Checks that `schema` is a plain identifier and returns it quoted.
pub(crate) fn quoted(schema: &str) -> Result<String> {
    let valid = !schema.is_empty()
        && schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(format!("\"{schema}\""))
    } else {
        Err(Error::Config(format!(
            "schema name `{schema}` must be 1-63 lower-case letters, digits or underscores"
        )))
    }
}

/// Runs `migrator` inside `schema` on a dedicated connection, creating the schema if needed.
///
/// A dedicated connection keeps the `search_path` change away from the caller's pool.
///
/// Each set of migrations keeps its own history table (`table`), so the saga tables and the
/// inbox may share a schema.
pub(crate) async fn migrate(
    pool: &PgPool,
    schema: &str,
    source: &Migrator,
    table: &'static str,
) -> Result<()> {
    let quoted = quoted(schema)?;
    let mut migrator = Migrator::with_migrations(source.iter().cloned().collect());
    migrator.dangerous_set_table_name(table);
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    // Serializes concurrent first starts, which would race on CREATE SCHEMA.
    sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
        .bind(format!("saga-migrate:{schema}"))
        .execute(&mut conn)
        .await?;
    let result = async {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {quoted}"
        )))
        .execute(&mut conn)
        .await?;
        sqlx::query(AssertSqlSafe(format!("SET search_path TO {quoted}")))
            .execute(&mut conn)
            .await?;
        // `run_direct` rather than `run`: `run`'s `Acquire` bound makes the future not `Send`
        // (sqlx's "not general enough"), so a migration could not be spawned.
        migrator.run_direct(None, &mut conn, false).await?;
        Ok::<_, Error>(())
    }
    .await;
    conn.close().await.ok();
    result
}

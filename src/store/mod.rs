//! PostgreSQL: the only module with SQL. Schema migrations and connecting (here), the private
//! cluster of a first run (`cluster`), the batch writer (`writer`, with `copy` and `rollup`),
//! the join of a call's sides after each write (`correlate`), the API and CLI's reads
//! (`queries`), the alert rules' windows and state (`alerts`), the backtest's history
//! (`history`), the notification outbox (`notify`), pruning (`retention`), the service's own
//! metric samples (`stats`). `copy` (the binary COPY encoding) is public for the benchmark's
//! reference COPY, in the `toolsight-loadgen` crate.

pub mod alerts;
pub mod cluster;
pub mod copy;
pub(crate) mod correlate;
#[cfg(feature = "backtest")]
pub(crate) mod history;
pub(crate) mod notify;
pub mod partitions;
pub mod policy;
pub mod queries;
pub mod retention;
pub mod rollup;
pub(crate) mod stats;
pub mod window;
pub mod writer;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

pub use writer::{SubmitError, Writer};

/// The `[database]` settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Database {
    pub url: String,
    pub create_database: bool,
    pub query_connections: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// When `toolsight serve` runs a private PostgreSQL cluster of its own.
    pub embedded: Embedded,
    /// Where that cluster lives; `None` is the default place (`cluster::default_dir`).
    pub embedded_dir: Option<std::path::PathBuf>,
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/toolsight";

impl Default for Database {
    fn default() -> Self {
        Database {
            url: DEFAULT_DATABASE_URL.into(),
            create_database: true,
            query_connections: 4,
            connect_timeout: Duration::from_secs(30),
            embedded: Embedded::Auto,
            embedded_dir: None,
        }
    }
}

/// When `toolsight serve` starts a private PostgreSQL cluster (from the system's PostgreSQL
/// binaries) instead of connecting to `database.url`. An explicit `database.url` is never
/// replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Embedded {
    /// When `database.url` is left at its default and nothing answers there.
    Auto,
    /// Whenever `database.url` is left at its default.
    Always,
    Never,
}

/// Errors of the storage layer. Each says whether trying again later can succeed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // The cause is part of the message (not a `source`), so error chains print it once.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    #[error("database rejected the statement: {0}")]
    Query(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("invalid database url: {0}")]
    Url(String),
}

impl StoreError {
    /// Whether the same operation may succeed later (the database is down, busy, or a
    /// transaction lost a deadlock), as opposed to failing again the same way.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// Whether the database refused the data itself (SQLSTATE class 22, data exception, or 23,
    /// integrity constraint violation) rather than the statement or the connection.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Query(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            _ => false,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let retryable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|c| {
                // connection exceptions, serialization failures / deadlocks, insufficient
                // resources, operator intervention (shutdown, crash recovery), a database not
                // accepting connections for now (55000) or a lock not available (55P03)
                c.starts_with("08")
                    || c == "40001"
                    || c == "40P01"
                    || c.starts_with("53")
                    || c.starts_with("57P")
                    || c == "55000"
                    || c == "55P03"
            }),
            _ => false,
        };
        if retryable {
            StoreError::Unavailable(e)
        } else {
            StoreError::Query(e)
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(e)
    }
}

/// The embedded migrations (`migrations/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Parses a database URL.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    url.parse::<PgConnectOptions>()
        // No JIT: once the planner's cost of the per-batch join query passes
        // `jit_above_cost`, JIT compiles it on every batch (measured: 473 ms of compilation
        // for a query that runs in 43 ms); the service's queries are short and many.
        .map(|o| {
            o.log_statements(tracing::log::LevelFilter::Trace)
                .options([("jit", "off")])
        })
        .map_err(|e| StoreError::Url(format!("{}: {e}", url_without_password(url))))
}

/// A URL safe to log: the password is replaced.
pub fn url_without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Creates the configured database when it does not exist yet (connecting to the `postgres`
/// maintenance database to do so).
pub async fn create_database_if_missing(opts: &PgConnectOptions) -> Result<bool, StoreError> {
    let Some(name) = opts.get_database().map(str::to_owned) else {
        return Ok(false);
    };
    let mut conn = opts.clone().database("postgres").connect().await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let ident = format!("\"{}\"", name.replace('"', "\"\""));
        let create = format!("CREATE DATABASE {ident}");
        match sqlx::query(&create).execute(&mut conn).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another replica created it first.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    conn.close().await.ok();
    Ok(!exists)
}

/// Drops the database `opts` names (ending its sessions) and creates it empty: the demo and the
/// benchmark start from nothing.
pub async fn recreate_database(opts: &PgConnectOptions) -> Result<(), StoreError> {
    let name = opts
        .get_database()
        .ok_or_else(|| StoreError::Url("no database name".into()))?;
    let mut conn = opts.clone().database("postgres").connect().await?;
    let ident = format!("\"{}\"", name.replace('"', "\"\""));
    sqlx::query(&format!("DROP DATABASE IF EXISTS {ident} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {ident}"))
        .execute(&mut conn)
        .await?;
    conn.close().await.ok();
    Ok(())
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// A pool for queries (API, CLI, readiness).
pub async fn query_pool(opts: &PgConnectOptions, max: u32) -> Result<PgPool, StoreError> {
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts.clone())
        .await?)
}

/// Whether the database answers.
pub async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

//! Runs the real service in-process on 127.0.0.1:0 against a fresh PostgreSQL database.
#![allow(dead_code)]

pub mod python;
pub mod spans;

use std::net::SocketAddr;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use toolsight::app::{self, Listeners};
use toolsight::config::Config;

/// The base URL of the test PostgreSQL server (`TOOLSIGHT_TEST_DATABASE_URL`, default local).
pub fn server_url() -> String {
    std::env::var("TOOLSIGHT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A connection to the test server's `postgres` database; without one, the test stops saying
/// what is missing and how to start it.
pub async fn admin_pool() -> PgPool {
    let url = format!("{}/postgres", server_url());
    match PgPool::connect(&url).await {
        Ok(p) => p,
        Err(e) => panic!(
            "these tests need PostgreSQL at {url} (user postgres, trust auth): {e}. \
             Start it (Debian/Ubuntu: `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) \
             main start`; elsewhere `pg_ctl -D <data dir> start`), \
             or set TOOLSIGHT_TEST_DATABASE_URL to another server"
        ),
    }
}

/// Drops the test database of `name` if it exists; returns its URL (the service creates it).
pub async fn fresh_database(name: &str) -> String {
    let db = format!("toolsight_it_{name}");
    let admin_pool = admin_pool().await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&admin_pool)
        .await
        .unwrap();
    admin_pool.close().await;
    format!("{}/{db}", server_url())
}

/// Takes the test database of `name` away from its clients (no new connections, existing ones
/// terminated), or gives it back.
pub async fn database_outage(name: &str, down: bool) {
    let db = format!("toolsight_it_{name}");
    let admin = admin_pool().await;
    sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS {}", !down))
        .execute(&admin)
        .await
        .unwrap();
    if down {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(&db)
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
}

/// How long a test waits for something that should happen. Generous on purpose: on a loaded
/// machine (a parallel build, the rest of the suite, a Python environment being created) what
/// usually takes a second can take many. A wait returns as soon as its condition holds, so the
/// bound costs nothing when things go well. `TOOLSIGHT_TEST_PATIENCE` (seconds) overrides it.
pub fn patience() -> Duration {
    std::env::var("TOOLSIGHT_TEST_PATIENCE")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(120))
}

/// Polls `f` every 100 ms until it returns something; fails the test after [`patience`].
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {:?} waiting for {what}", patience());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child process, killed (SIGKILL: no graceful shutdown) when dropped.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `toolsight` binary, as a command to run.
pub fn toolsight() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_toolsight"))
}

/// Runs `cmd`, fails the test with its stderr unless it succeeds, returns its stdout.
pub fn output(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A port nobody listens on right now (the kernel picks it; released before returning).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `toolsight serve --config CONFIG` running as a child process, ready: its `/readyz` answered
/// 200, so its database exists and is migrated. Killed (SIGKILL) when dropped.
pub struct Child {
    pub process: Process,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// The child's stderr (its log).
    pub log: std::path::PathBuf,
}

impl Child {
    pub fn http_url(&self) -> String {
        format!("http://{}/v1/traces", self.http)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Starts `toolsight serve --config CONFIG` (with `env` added) on free loopback ports and waits
/// until it is ready: never a port alone, since the listeners are bound before the database is
/// created and migrated. Fails the test with the child's log when it exits or is not ready within
/// [`patience`].
pub async fn serve_ready(config: &std::path::Path, env: &[(&str, String)]) -> Child {
    toolsight::install_crypto_provider();
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    // A free port can be taken by someone else before the child binds it: then try new ones.
    for _ in 0..3 {
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("serve-{}-{n}.log", std::process::id()));
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let (grpc, http, admin) = (addr(free_port()), addr(free_port()), addr(free_port()));
        let mut cmd = toolsight();
        cmd.args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("TOOLSIGHT_OTLP__GRPC_LISTEN", grpc.to_string())
            .env("TOOLSIGHT_OTLP__HTTP_LISTEN", http.to_string())
            .env("TOOLSIGHT_ADMIN__LISTEN", admin.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = Child {
            process: Process(cmd.spawn().unwrap()),
            grpc,
            http,
            admin,
            log,
        };
        match child.wait_ready().await {
            Ok(()) => return child,
            Err(tail) if tail.contains("cannot listen") => continue,
            Err(tail) => panic!("toolsight serve did not become ready:\n{tail}"),
        }
    }
    panic!("toolsight serve found no free ports in three tries");
}

impl Child {
    /// Polls `/readyz` until it answers 200; the log tail if the child exits or time runs out.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + patience();
        loop {
            if let Ok(r) = client
                .get(format!("http://{}/readyz", self.admin))
                .send()
                .await
                && r.status() == 200
            {
                return Ok(());
            }
            if let Ok(Some(status)) = self.process.0.try_wait() {
                return Err(format!("exited ({status}):\n{}", self.log_tail()));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "/readyz not 200 after {:?}:\n{}",
                    patience(),
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub struct Service {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub pool: PgPool,
    pub database_url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    /// Starts toolsight on a database named after the test, dropped first if it exists.
    pub async fn start(name: &str) -> Service {
        Self::start_with(name, |_| {}).await
    }

    pub async fn start_with(name: &str, tweak: impl FnOnce(&mut Config)) -> Service {
        fresh_database(name).await;
        Self::replica(name, tweak).await
    }

    /// Another service on the database of `name`, kept as it is (a second replica).
    pub async fn replica(name: &str, tweak: impl FnOnce(&mut Config)) -> Service {
        let db = format!("toolsight_it_{name}");

        let mut config = Config::default();
        config.database.url = format!("{}/{db}", server_url());
        config.otlp.grpc_listen = "127.0.0.1:0".parse().unwrap();
        config.otlp.http_listen = "127.0.0.1:0".parse().unwrap();
        config.admin.listen = "127.0.0.1:0".parse().unwrap();
        tweak(&mut config);
        let listeners = Listeners::bind(&config).await.unwrap();
        let (grpc, http, admin) = listeners.addrs().unwrap();
        let database_url = config.database.url.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app::run(config, listeners, async {
            let _ = stopped.await;
        }));
        let svc = Service {
            grpc,
            http,
            admin,
            pool: PgPool::connect_lazy(&database_url).unwrap(),
            database_url,
            stop: Some(stop),
            task: Some(task),
        };
        svc.wait_ready().await;
        svc
    }

    async fn wait_ready(&self) {
        self.wait_readyz(200).await;
    }

    /// Waits until `/readyz` answers `want` (200 ready, 503 database unreachable), up to
    /// [`patience`].
    pub async fn wait_readyz(&self, want: u16) {
        toolsight::install_crypto_provider();
        // The admin port may serve TLS (with a test CA): readiness is all this checks.
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        let deadline = tokio::time::Instant::now() + patience();
        while tokio::time::Instant::now() < deadline {
            for scheme in ["http", "https"] {
                if let Ok(r) = client
                    .get(format!("{scheme}://{}/readyz", self.admin))
                    .send()
                    .await
                    && r.status() == want
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("/readyz never answered {want} within {:?}", patience());
    }

    pub fn http_url(&self) -> String {
        format!("http://{}/v1/traces", self.http)
    }

    pub async fn metrics(&self) -> String {
        scrape(self.admin).await
    }

    /// The value of one sample line of `/metrics`, e.g. `toolsight_exports_total{result="malformed",transport="http_json"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(self.admin, series).await
    }

    /// Stops the service (graceful shutdown) and returns its result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// The `/metrics` text of the admin port at `admin` (plain HTTP).
pub async fn scrape(admin: SocketAddr) -> String {
    toolsight::install_crypto_provider();
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one sample of `/metrics` at `admin` (0 when absent); see [`sample`].
pub async fn metric_value(admin: SocketAddr, series: &str) -> f64 {
    sample(&scrape(admin).await, series).unwrap_or(0.0)
}

/// The value of the sample `series` in a `/metrics` text, when present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        labels_match(name, series)
            .then(|| value.parse().ok())
            .flatten()
    })
}

/// `name{a="1",b="2"}` matches `name{b="2",a="1"}`: label order is not significant.
fn labels_match(line_series: &str, wanted: &str) -> bool {
    let split = |s: &str| -> (String, Vec<String>) {
        match s.split_once('{') {
            Some((n, rest)) => {
                let mut labels: Vec<String> = rest
                    .trim_end_matches('}')
                    .split(',')
                    .map(str::to_owned)
                    .collect();
                labels.sort();
                (n.to_owned(), labels)
            }
            None => (s.to_owned(), vec![]),
        }
    };
    split(line_series) == split(wanted)
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Waits until `/api/v1/alerts` of the admin port `admin` lists a firing alert that `matches`,
/// and returns it.
#[allow(dead_code)] // not every test binary uses it
pub async fn firing_alert(
    what: &str,
    admin: SocketAddr,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually(what, || async {
        let api: serde_json::Value = reqwest::get(format!("http://{admin}/api/v1/alerts"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        api["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["state"] == "firing" && matches(a))
            .cloned()
    })
    .await
}

/// The (service, tool, side) whose rollups differ from the counted raw rows, for every column
/// the rules and dashboards read (a rollup row a join emptied sums to zero everywhere), and
/// where the rules' per-minute state differs from the raw rows ([`rule_state_mismatches`]).
pub async fn rollup_mismatches(pool: &sqlx::PgPool) -> Vec<(String, String, String)> {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query(
        "CREATE OR REPLACE FUNCTION pg_temp.trimmed(h bigint[]) RETURNS bigint[] LANGUAGE sql AS $$
            SELECT coalesce(h[1:(SELECT max(i) FROM unnest(h) WITH ORDINALITY AS t(x, i) WHERE x <> 0)],
                            '{}')
         $$",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let mut mismatches: Vec<(String, String, String)> = sqlx::query_as(
        "WITH raw AS (
            SELECT service, tool, side, count(*) AS calls,
                   count(*) FILTER (WHERE outcome = 'error') AS errors,
                   count(*) FILTER (WHERE outcome = 'cancelled') AS cancellations,
                   count(result_empty) AS with_result,
                   count(*) FILTER (WHERE result_empty) AS empty_results,
                   coalesce(sum(result_bytes), 0) AS result_bytes,
                   coalesce(sum(result_items), 0) AS result_items,
                   count(result_bytes) AS sized_results,
                   count(result_items) AS counted_results,
                   sum(duration_us) AS duration_us_sum,
                   count(overhead_us) AS overhead_calls,
                   coalesce(sum(overhead_us), 0) AS overhead_us_sum
            FROM tool_calls WHERE counted GROUP BY 1, 2, 3),
         rolled AS (
            SELECT service, tool, side, sum(calls) AS calls, sum(errors) AS errors,
                   sum(cancellations) AS cancellations, sum(with_result) AS with_result,
                   sum(empty_results) AS empty_results, sum(result_bytes) AS result_bytes,
                   sum(result_items) AS result_items, sum(sized_results) AS sized_results,
                   sum(counted_results) AS counted_results, sum(duration_us_sum) AS duration_us_sum,
                   sum(overhead_calls) AS overhead_calls, sum(overhead_us_sum) AS overhead_us_sum,
                   toolsight_hist_merge(latency_hist) AS hist
            FROM tool_rollup_1m GROUP BY 1, 2, 3
            HAVING sum(calls) <> 0 OR sum(errors) <> 0 OR sum(cancellations) <> 0
                OR sum(with_result) <> 0 OR sum(duration_us_sum) <> 0 OR sum(overhead_calls) <> 0),
         raw_hist AS (
            SELECT service, tool, side, toolsight_hist_build(array_agg(b), array_agg(n)) AS hist
            FROM (SELECT service, tool, side, toolsight_latency_bucket(duration_us) AS b, count(*) AS n
                  FROM tool_calls WHERE counted GROUP BY 1, 2, 3, 4) x
            GROUP BY 1, 2, 3)
         SELECT service, tool, side
         FROM raw JOIN raw_hist USING (service, tool, side)
              FULL JOIN rolled USING (service, tool, side)
         WHERE (raw.calls, raw.errors, raw.cancellations, raw.with_result, raw.empty_results,
                raw.result_bytes, raw.result_items, raw.sized_results, raw.counted_results,
                raw.duration_us_sum, raw.overhead_calls, raw.overhead_us_sum)
               IS DISTINCT FROM
               (rolled.calls, rolled.errors, rolled.cancellations, rolled.with_result,
                rolled.empty_results, rolled.result_bytes, rolled.result_items,
                rolled.sized_results, rolled.counted_results, rolled.duration_us_sum,
                rolled.overhead_calls, rolled.overhead_us_sum)
            -- trailing zero buckets left by a correction do not change a histogram
            OR pg_temp.trimmed(raw_hist.hist) IS DISTINCT FROM pg_temp.trimmed(rolled.hist)",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    mismatches.extend(rule_state_mismatches(&mut conn).await);
    mismatches
}

/// Where the retry-loop and token-burn rules' per-minute state differs from the raw rows it
/// summarizes, by the raw-row definition (`LOOP_CALLS`): (table, key, minute or span id).
/// Sessions folded by the cardinality guard have no state (the rules skip them).
pub async fn rule_state_mismatches(conn: &mut sqlx::PgConnection) -> Vec<(String, String, String)> {
    let loop_calls = toolsight::store::alerts::LOOP_CALLS;
    sqlx::query_as(&format!(
        "WITH raw AS (
            SELECT date_trunc('minute', start_time) AS minute, service, tool, session_key,
                   coalesce(args_hash, '\\x'::bytea) AS args_hash, count(*) AS calls,
                   count(*) FILTER (WHERE outcome <> 'ok') AS failed,
                   count(*) FILTER (WHERE outcome <> 'ok' OR result_empty IS TRUE) AS stuck
            FROM tool_calls t WHERE {loop_calls} AND session_key <> '__overflow__'
            GROUP BY 1, 2, 3, 4, 5),
         state AS (
            SELECT minute, service, tool, session_key, args_hash, sum(calls) AS calls,
                   sum(failed) AS failed, sum(stuck) AS stuck
            FROM loop_calls_1m GROUP BY 1, 2, 3, 4, 5
            HAVING sum(calls) <> 0 OR sum(failed) <> 0 OR sum(stuck) <> 0),
         raw_tokens AS (
            SELECT date_trunc('minute', start_time) AS minute, service, session_key,
                   sum(input_tokens + output_tokens) AS tokens
            FROM llm_calls WHERE session_key <> '__overflow__' GROUP BY 1, 2, 3),
         state_tokens AS (
            SELECT minute, service, session_key, sum(tokens) AS tokens
            FROM session_tokens_1m GROUP BY 1, 2, 3)
         SELECT 'loop_calls_1m', service || '/' || tool || '/' || session_key, minute::text
         FROM raw FULL JOIN state USING (minute, service, tool, session_key, args_hash)
         WHERE (raw.calls, raw.failed, raw.stuck) IS DISTINCT FROM (state.calls, state.failed, state.stuck)
         UNION ALL
         SELECT 'tool_calls.loop_counted', service || '/' || tool, encode(span_id, 'hex')
         FROM tool_calls t WHERE loop_counted IS DISTINCT FROM ({loop_calls})
         UNION ALL
         SELECT 'session_tokens_1m', service || '/' || session_key, minute::text
         FROM raw_tokens FULL JOIN state_tokens USING (minute, service, session_key)
         WHERE raw_tokens.tokens IS DISTINCT FROM state_tokens.tokens"
    ))
    .fetch_all(&mut *conn)
    .await
    .unwrap()
}

/// Counted client and server rows of one call that point at each other: the joined calls.
pub const JOINED_PAIRS: &str = "SELECT count(*) FROM tool_calls c JOIN tool_calls s
       ON s.trace_id = c.trace_id AND s.span_id = c.peer_span_id AND s.peer_span_id = c.span_id
     WHERE c.side = 'client' AND s.side = 'server' AND c.counted AND s.counted";

/// A fresh, migrated database named `toolsight_it_{name}`.
pub async fn migrated_db(name: &str) -> PgPool {
    let url = fresh_database(name).await;
    let admin = admin_pool().await;
    sqlx::query(&format!("CREATE DATABASE toolsight_it_{name}"))
        .execute(&admin)
        .await
        .unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    toolsight::store::MIGRATOR.run(&pool).await.unwrap();
    pool
}

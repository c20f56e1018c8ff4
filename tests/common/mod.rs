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

/// Drops the test database of `name` if it exists; returns its URL (the service creates it).
pub async fn fresh_database(name: &str) -> String {
    let db = format!("toolsight_it_{name}");
    let admin_pool = PgPool::connect(&format!("{}/postgres", server_url()))
        .await
        .expect("test postgres reachable");
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
    let admin = PgPool::connect(&format!("{}/postgres", server_url()))
        .await
        .unwrap();
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

/// Polls `f` every 100 ms until it returns something; fails the test after `secs` seconds.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> F,
) -> T {
    for _ in 0..secs * 10 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
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

/// `toolsight serve --config CONFIG` as a child process, with `env` added.
pub fn serve(config: &std::path::Path, env: &[(&str, String)]) -> Process {
    let mut cmd = toolsight();
    cmd.args(["serve", "--config"])
        .arg(config)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    Process(cmd.spawn().unwrap())
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

    /// Waits until `/readyz` answers `want` (200 ready, 503 database unreachable), up to 30 s.
    pub async fn wait_readyz(&self, want: u16) {
        toolsight::install_crypto_provider();
        // The admin port may serve TLS (with a test CA): readiness is all this checks.
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        for _ in 0..300 {
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
        panic!("/readyz never answered {want}");
    }

    pub fn http_url(&self) -> String {
        format!("http://{}/v1/traces", self.http)
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one sample line of `/metrics`, e.g. `toolsight_exports_total{result="malformed",transport="http_json"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                labels_match(name, series)
                    .then(|| value.parse().ok())
                    .flatten()
            })
            .unwrap_or(0.0)
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

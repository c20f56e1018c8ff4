//! `toolsight bench`: starts the service on a fresh database, drives it with the load
//! generator, checks that every accepted span is in PostgreSQL, and measures the bare-COPY
//! ceiling of the same rows in the same run.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use chrono::DurationRound;
use serde::Serialize;

use crate::db;
use crate::{LoadConfig, Protocol, Report, Traffic};
use toolsight::{normalize, store};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// PostgreSQL server (the benchmark creates and drops its own databases there).
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432",
        env = "TOOLSIGHT_BENCH_SERVER"
    )]
    server: String,
    /// Length of each measured phase.
    #[arg(long, default_value = "20s")]
    phase: humantime::Duration,
    /// Length of the 10x-overload phase.
    #[arg(long, default_value = "40s")]
    overload: humantime::Duration,
    /// Length of an extra steady phase at 50% of the maximum (RSS flatness); 0s to skip.
    #[arg(long, default_value = "0s")]
    soak: humantime::Duration,
    #[arg(long, default_value_t = 1000)]
    spans_per_request: usize,
    /// Concurrent exporters in the closed-loop phases (enough to keep the service busy).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Writer connections of the service under test.
    #[arg(long, default_value_t = 2)]
    writers: usize,
    /// Records per database write of the service under test.
    #[arg(long, default_value_t = 10_000)]
    batch_rows: usize,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench-report.json")]
    report: PathBuf,
    /// Instead of ingest: the alert quality of the default rules on simulated steady traffic
    /// (false firings per 1,000 series-hours at 3, 30 and 300 calls a minute per series).
    #[arg(long)]
    alerts: bool,
    /// Series per simulation (with --alerts), or (service, tool) series in the window (with
    /// --rules).
    #[arg(long, default_value_t = 5000)]
    series: usize,
    /// Instead of ingest: the cost of one evaluation of each default rule group over a window
    /// holding `--series` (service, tool) series and `--sessions` agent sessions, seeded into a
    /// fresh database (`toolsight_bench_rules`).
    #[arg(long)]
    rules: bool,
    /// Agent sessions in the window (with --rules): each active 5 minutes of the last 30, three
    /// distinct calls a minute, and LLM tokens.
    #[arg(long, default_value_t = 50_000)]
    sessions: usize,
    /// Evaluations of each group after the first (with --rules), each after a minute of new
    /// rows; the first, the median and the slowest are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Instead of ingest: fill a fresh database (`toolsight_bench_backtest`) with 7 days of
    /// `--series` tools for timing `toolsight rules backtest --from 7d` against it.
    #[arg(long)]
    seed_backtest: bool,
    /// Instead of the phases: the maximum closed-loop rate (gRPC) held this long on one
    /// database, reported per minute (throughput, export latency, the default rules' evaluation
    /// time, table and index sizes, WAL written, RSS).
    #[arg(long, default_value = "0s")]
    sustained: humantime::Duration,
    /// The service's raw-row policy (`ingest.raw_keep_ok`): share of traces whose ordinary calls
    /// keep their raw rows; after a sustained run, rows and bytes kept and sampled out.
    #[arg(long, default_value_t = 1.0)]
    raw_keep_ok: f64,
    /// The `toolsight` binary under test (default: the one built beside this one).
    #[arg(long)]
    service: Option<PathBuf>,
}

/// The service binary: `--service`, else `toolsight` in this binary's own directory (both are
/// built into the same target directory by `cargo build --release --workspace`).
fn service_binary(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.service {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let beside = me.with_file_name("toolsight");
    if beside.exists() {
        Ok(beside)
    } else {
        bail!(
            "no toolsight binary at {}: build it (`cargo build --release --workspace`) or pass --service",
            beside.display()
        )
    }
}

#[derive(Debug, Serialize, Clone)]
struct Phase {
    name: String,
    report: Report,
    rss_start_mib: f64,
    rss_end_mib: f64,
    rss_max_mib: f64,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    date: String,
    machine: String,
    spans_per_request: usize,
    phases: Vec<Phase>,
    max_spans_per_sec_grpc: f64,
    max_spans_per_sec_http: f64,
    records_per_span: f64,
    records_expected: u64,
    records_in_postgres: i64,
    peak_rss_mib: f64,
    copy_reference_rows: u64,
    copy_reference_rows_per_sec: f64,
    end_to_end_rows_per_sec_grpc: f64,
    ratio_to_copy: f64,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// (current RSS, peak RSS) of a process, in MiB, from /proc.
fn rss_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

struct Service {
    child: Child,
    grpc: String,
    http: String,
    admin: String,
}

impl Service {
    async fn start(
        binary: &std::path::Path,
        database_url: &str,
        writers: usize,
        batch_rows: usize,
        raw_keep_ok: f64,
        log: &PathBuf,
    ) -> anyhow::Result<Service> {
        let (grpc, http, admin) = (free_port()?, free_port()?, free_port()?);
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(binary)
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("TOOLSIGHT_OTLP__GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
            .env("TOOLSIGHT_OTLP__HTTP_LISTEN", format!("127.0.0.1:{http}"))
            .env("TOOLSIGHT_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
            .env("TOOLSIGHT_INGEST__WRITERS", writers.to_string())
            .env("TOOLSIGHT_INGEST__BATCH_ROWS", batch_rows.to_string())
            .env("TOOLSIGHT_INGEST__RAW_KEEP_OK", raw_keep_ok.to_string())
            .env("TOOLSIGHT_LOG__LEVEL", "warn")
            .env_remove("TOOLSIGHT_CONFIG")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting toolsight serve")?;
        let svc = Service {
            child,
            grpc: format!("127.0.0.1:{grpc}"),
            http: format!("127.0.0.1:{http}"),
            admin: format!("127.0.0.1:{admin}"),
        };
        toolsight::install_crypto_provider();
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(r) = client
                .get(format!("http://{}/readyz", svc.admin))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(svc);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the service did not become ready; see {}", log.display())
    }

    fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill()?;
        bail!("the service did not stop within 30 s of SIGTERM")
    }
}

/// What the sustained run reads after each minute: the service's rule evaluation metrics and
/// the database's sizes and WAL position.
struct Watch {
    client: reqwest::Client,
    admin: String,
    wal_start: i64,
}

struct Seen {
    metrics: String,
    missed: u64,
    raw_bytes: i64,
    other_bytes: i64,
    wal_bytes: i64,
}

impl Seen {
    /// The last evaluation of `group`, in milliseconds.
    fn group_ms(&self, group: &str) -> f64 {
        let series = format!("toolsight_rule_group_duration_seconds{{group=\"{group}\"}} ");
        self.metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(f64::NAN, |s| s * 1000.0)
    }
}

const RAW: [&str; 4] = ["tool_calls", "mcp_requests", "llm_calls", "upstream_calls"];
const AGGREGATES: [&str; 6] = [
    "tool_rollup_1m",
    "mcp_method_rollup_1m",
    "llm_rollup_1m",
    "upstream_rollup_1m",
    "loop_calls_1m",
    "session_tokens_1m",
];

impl Watch {
    async fn new(pool: &sqlx::PgPool, admin: &str) -> anyhow::Result<Watch> {
        let wal_start: i64 =
            sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
                .fetch_one(pool)
                .await?;
        Ok(Watch {
            client: reqwest::Client::new(),
            admin: admin.to_owned(),
            wal_start,
        })
    }

    async fn now(&self, pool: &sqlx::PgPool) -> anyhow::Result<Seen> {
        let metrics = self
            .client
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await?
            .text()
            .await?;
        let missed = metrics
            .lines()
            .filter(|l| l.starts_with("toolsight_rule_group_iterations_missed_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
        let size = |tables: &[&str]| {
            tables
                .iter()
                .map(|t| format!("SELECT relid FROM pg_partition_tree('{t}') WHERE isleaf"))
                .collect::<Vec<_>>()
                .join(" UNION ALL ")
        };
        let (raw_bytes, other_bytes, wal): (i64, i64, i64) = sqlx::query_as(&format!(
            "SELECT (SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint FROM ({}) r),
                    (SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint FROM ({}) a),
                    pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
            size(&RAW),
            size(&AGGREGATES)
        ))
        .fetch_one(pool)
        .await?;
        Ok(Seen {
            metrics,
            missed,
            raw_bytes,
            other_bytes,
            wal_bytes: wal - self.wal_start,
        })
    }
}

/// `toolsight bench --alerts`: the default rules' false firings on steady traffic.
fn alert_quality(args: &BenchArgs) -> anyhow::Result<()> {
    use toolsight::evaluate::quality::{Steady, steady};
    let rules = toolsight::evaluate::rules::parse(
        "alerts/default.yaml",
        toolsight::evaluate::run::DEFAULT_RULES,
    )
    .map_err(|p| anyhow::anyhow!("the default rules: {p:?}"))?;
    println!(
        "steady traffic: {} series per rate, 1 hour each, 1% errors, 10% empty results, \
         log-normal latency (median 200 ms, sigma 0.5)\n",
        args.series
    );
    println!(
        "| rule | calls/min per series | series that fired | firings | per 1,000 series-hours |"
    );
    println!("|---|---|---|---|---|");
    for rate in [3u32, 30, 300] {
        for r in rules.groups.iter().flat_map(|g| &g.rules) {
            let traffic = Steady {
                calls_per_min: rate,
                series: args.series,
                ..Steady::default()
            };
            let started = Instant::now();
            let Some(q) = steady(r, &traffic, 0x5eed ^ u64::from(rate)) else {
                continue;
            };
            eprintln!(
                "   {} at {rate}/min: {:.1} s",
                r.alert,
                started.elapsed().as_secs_f64()
            );
            println!(
                "| {} | {rate} | {} | {} | {:.2} |",
                r.alert,
                q.series_fired,
                q.firings,
                q.per_1000_series_hours()
            );
        }
    }
    Ok(())
}

/// The evaluations of each default rule group over seeded state: the first (whole windows
/// read), then `rounds` more, each after a minute of new rows.
async fn rules_cost(args: &BenchArgs) -> anyhow::Result<()> {
    let server = store::connect_options(&args.server)?;
    let opts = db::recreate_database(&server, "toolsight_bench_rules").await?;
    let pool = store::query_pool(&opts, 4).await?;
    store::migrate(&pool).await?;
    let now = chrono::Utc::now();
    eprintln!(
        "== seeding {} series and {} sessions (70 minutes of rollups, 30 of agent sessions)",
        args.series, args.sessions
    );
    let started = Instant::now();
    let rows = db::seed_rule_state(&pool, now, args.series, args.sessions).await?;
    eprintln!("   {rows} rows in {:.1} s", started.elapsed().as_secs_f64());
    let files = toolsight::evaluate::run::load_rules(&[])?;
    let mut ev = toolsight::evaluate::run::Evaluator::new(pool.clone(), files);
    let groups = ev.groups().len();
    let minute = now.duration_trunc(chrono::Duration::minutes(1))?;
    // The first evaluation reads the whole windows; each later one follows a minute of new
    // rows (every series, a 26th of the sessions), as the live loop does.
    let mut first = vec![0.0; groups];
    let mut later: Vec<Vec<f64>> = vec![Vec::new(); groups];
    for r in 0..=args.rounds.max(1) {
        let at = minute + chrono::Duration::minutes(r as i64 + 1);
        if r > 0 {
            let t = Instant::now();
            let n = db::seed_minute(
                &pool,
                at - chrono::Duration::minutes(1),
                args.series,
                args.sessions,
            )
            .await?;
            eprintln!(
                "   minute {r}: {n} new rows in {:.0} ms",
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
        for g in 0..groups {
            let t = Instant::now();
            ev.evaluate_group_at(g, at).await?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if r == 0 {
                first[g] = ms;
            } else {
                later[g].push(ms);
            }
        }
    }
    println!(
        "| group | series | sessions | first ms | median ms | slowest ms | rounds |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    if let Some((rss, peak)) = rss_mib(std::process::id()) {
        eprintln!(
            "   this process (the evaluator and its kept windows): RSS {rss:.0} MiB, peak {peak:.0} MiB"
        );
    }
    for (g, group) in ev.groups().iter().enumerate() {
        let ms = &mut later[g];
        ms.sort_by(f64::total_cmp);
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {} |",
            group.name,
            args.series,
            args.sessions,
            first[g],
            ms[ms.len() / 2],
            ms[ms.len() - 1],
            ms.len()
        );
    }
    pool.close().await;
    Ok(())
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.alerts {
        return tokio::task::spawn_blocking(move || alert_quality(&args)).await?;
    }
    if args.rules {
        return rules_cost(&args).await;
    }
    if args.seed_backtest {
        let server = store::connect_options(&args.server)?;
        let opts = db::recreate_database(&server, "toolsight_bench_backtest").await?;
        let pool = store::query_pool(&opts, 2).await?;
        store::migrate(&pool).await?;
        eprintln!("== seeding 7 days of {} tools", args.series);
        let started = Instant::now();
        let rows = db::seed_week(&pool, chrono::Utc::now(), args.series).await?;
        eprintln!(
            "   {rows} rows in {:.1} s; now run, e.g.:\n   DATABASE_URL={}/toolsight_bench_backtest toolsight rules backtest --from 7d",
            started.elapsed().as_secs_f64(),
            args.server.trim_end_matches('/')
        );
        return Ok(());
    }
    let binary = service_binary(&args)?;
    let server = store::connect_options(&args.server)?;
    let db = db::recreate_database(&server, "toolsight_bench").await?;
    let db_url = format!("{}/toolsight_bench", args.server.trim_end_matches('/'));
    let log = PathBuf::from("target/bench-service.log");
    eprintln!(
        "== starting toolsight on a fresh database (log: {})",
        log.display()
    );
    let svc = Service::start(
        &binary,
        &db_url,
        args.writers,
        args.batch_rows,
        args.raw_keep_ok,
        &log,
    )
    .await?;
    let pid = svc.child.id();

    // RSS sampled every 250 ms for the whole run.
    let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let sampler = {
        let samples = samples.clone();
        tokio::spawn(async move {
            loop {
                if let Some((rss, _)) = rss_mib(pid) {
                    samples.lock().map(|mut s| s.push(rss)).ok();
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut phases: Vec<Phase> = Vec::new();
    let mut run_id: u16 = 1;
    let mut phase = |name: &str,
                     protocol: Protocol,
                     rate: Option<f64>,
                     duration: Duration,
                     concurrency: usize| {
        run_id += 1;
        let endpoint = if protocol == Protocol::Grpc {
            svc.grpc.clone()
        } else {
            svc.http.clone()
        };
        let cfg = LoadConfig {
            protocol,
            endpoint,
            gzip: false,
            concurrency,
            spans_per_request: args.spans_per_request,
            rate,
            duration,
            progress: true,
            run_id,
            timeout: Duration::from_secs(30),
        };
        let name = name.to_owned();
        let samples = samples.clone();
        async move {
            eprintln!("== {name}");
            let from = samples.lock().map(|s| s.len()).unwrap_or(0);
            let report = crate::run(cfg).await?;
            let s = samples
                .lock()
                .map(|s| s[from.min(s.len())..].to_vec())
                .unwrap_or_default();
            report.print();
            Ok::<Phase, anyhow::Error>(Phase {
                name,
                rss_start_mib: s.first().copied().unwrap_or(0.0),
                rss_end_mib: s.last().copied().unwrap_or(0.0),
                rss_max_mib: s.iter().copied().fold(0.0, f64::max),
                report,
            })
        }
    };

    let phase_len: Duration = args.phase.into();
    phases.push(
        phase(
            "warm-up (grpc, closed loop)",
            Protocol::Grpc,
            None,
            Duration::from_secs(5),
            args.concurrency,
        )
        .await?,
    );
    let sustained: Duration = args.sustained.into();
    if !sustained.is_zero() {
        let pool = store::query_pool(&db, 2).await?;
        // A whole partition three days old, for retention to drop halfway through.
        let aged = db::age_rows(&pool, 1_000_000, chrono::Duration::days(3)).await?;
        eprintln!("== {aged} stored rows copied three days back (a partition to drop)");
        let watch = Watch::new(&pool, &svc.admin).await?;
        println!(
            "| minute | spans/s | p50 ms | p99 ms | tool-health ms | agent-behaviour ms | upstreams ms | missed | raw tables MiB | rollups + state MiB | WAL MiB | RSS MiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let minutes = sustained.as_secs().div_ceil(60).max(1);
        let mut rates = Vec::new();
        let mut prune = None;
        for m in 1..=minutes {
            if m == minutes / 2 + 1 {
                // Retention under full ingest: `toolsight prune` drops the aged partition.
                prune = Some(
                    Command::new(&binary)
                        .arg("prune")
                        .env("DATABASE_URL", &db_url)
                        .env("TOOLSIGHT_RETENTION__RAW", "2d")
                        // A raw retention below the accepted span age is refused.
                        .env("TOOLSIGHT_INGEST__MAX_SPAN_AGE", "1d")
                        .env_remove("TOOLSIGHT_CONFIG")
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .context("starting toolsight prune")?,
                );
                eprintln!("== minute {m}: toolsight prune (raw retention 2d) runs beside ingest");
            }
            let p = phase(
                &format!("sustained minute {m}/{minutes}, grpc, closed loop"),
                Protocol::Grpc,
                None,
                Duration::from_secs(60),
                args.concurrency,
            )
            .await?;
            let w = watch.now(&pool).await?;
            rates.push(p.report.accepted_spans_per_sec);
            println!(
                "| {m} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                p.report.accepted_spans_per_sec,
                p.report.latency_p50_ms,
                p.report.latency_p99_ms,
                w.group_ms("tool-health"),
                w.group_ms("agent-behaviour"),
                w.group_ms("upstreams"),
                w.missed,
                w.raw_bytes as f64 / 1048576.0,
                w.other_bytes as f64 / 1048576.0,
                w.wal_bytes as f64 / 1048576.0,
                p.rss_end_mib,
            );
            phases.push(p);
        }
        if let Some(p) = prune {
            let out = p.wait_with_output()?;
            eprintln!(
                "== toolsight prune: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if !out.status.success() {
                bail!("toolsight prune failed beside ingest");
            }
        }
        let records_expected: u64 = phases.iter().map(|p| p.report.records_expected).sum();
        let records = db::count_records(&pool).await?;
        let w = watch.now(&pool).await?;
        for (what, rows, bytes) in db::raw_policy_split(&pool).await? {
            println!(
                "{what}: {rows} rows, {:.0} MiB, {:.0} bytes per row",
                bytes as f64 / 1048576.0,
                bytes as f64 / rows.max(1) as f64
            );
        }
        pool.close().await;
        svc.stop()?;
        sampler.abort();
        let (first, last) = (rates[0], rates[rates.len() - 1]);
        println!(
            "\nlast minute / first: {:.2}; evaluations missed: {}; {records} of {records_expected} records stored; raw tables {:.0} bytes per record (heap, indexes, TOAST)",
            last / first,
            w.missed,
            w.raw_bytes as f64 / records.max(1) as f64
        );
        if records as u64 != records_expected {
            bail!(
                "LOST OR EXTRA ROWS: {records} records in PostgreSQL, {records_expected} expected"
            );
        }
        return Ok(());
    }
    let grpc = phase(
        "max throughput, grpc, closed loop",
        Protocol::Grpc,
        None,
        phase_len,
        args.concurrency,
    )
    .await?;
    let max_grpc = grpc.report.accepted_spans_per_sec;
    phases.push(grpc);
    let http = phase(
        "max throughput, http/protobuf, closed loop",
        Protocol::HttpProtobuf,
        None,
        phase_len,
        args.concurrency,
    )
    .await?;
    let max_http = http.report.accepted_spans_per_sec;
    phases.push(http);
    for share in [0.5, 0.8] {
        let name = format!("{:.0}% of max, grpc, open loop", share * 100.0);
        phases.push(phase(&name, Protocol::Grpc, Some(max_grpc * share), phase_len, 64).await?);
    }
    let soak: Duration = args.soak.into();
    if !soak.is_zero() {
        phases.push(
            phase(
                "soak at 50% of max, grpc, open loop",
                Protocol::Grpc,
                Some(max_grpc * 0.5),
                soak,
                64,
            )
            .await?,
        );
    }
    phases.push(
        phase(
            "10x overload, grpc, open loop",
            Protocol::Grpc,
            Some(max_grpc * 10.0),
            args.overload.into(),
            // More requests in flight than the service admits, so backpressure must act.
            512,
        )
        .await?,
    );

    sampler.abort();
    let peak_rss = rss_mib(pid).map_or(0.0, |(_, hwm)| hwm);
    let pool = store::query_pool(&db, 2).await?;
    let records_in_postgres = db::count_records(&pool).await?;
    let records_expected: u64 = phases.iter().map(|p| p.report.records_expected).sum();
    pool.close().await;
    svc.stop()?;

    // The reference ceiling: the records of as many requests as the gRPC phase committed,
    // written by bare binary COPY into the same schema.
    eprintln!("== reference: bare binary COPY of the same rows (2 connections)");
    let grpc_phase = &phases[1].report;
    let requests = (grpc_phase.spans_accepted / args.spans_per_request.max(1) as u64)
        .clamp(10, 2_000) as usize;
    let mut traffic = Traffic::new(args.spans_per_request, 0, 0xC0FFEE);
    let mut batches = Vec::with_capacity(requests);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    for k in 0..requests {
        let t = now - (requests - k) as u64 * 1_000_000;
        batches.push(normalize::normalize(
            traffic.next(9999, t),
            now as i64,
            &normalize::Options::default(),
        ));
    }
    let ref_db = db::recreate_database(&server, "toolsight_bench_copyref").await?;
    let ref_pool = store::query_pool(&ref_db, 2).await?;
    store::migrate(&ref_pool).await?;
    let retention = store::retention::Retention::default();
    store::partitions::prepare(
        &ref_pool,
        &retention,
        Duration::from_secs(3600),
        chrono::Utc::now(),
    )
    .await?;
    let (copy_rows, copy_time) = db::copy_reference(&ref_pool, batches, 2).await?;
    ref_pool.close().await;
    let copy_rps = copy_rows as f64 / copy_time.as_secs_f64();

    let e2e_rps = grpc_phase.records_expected as f64 / grpc_phase.elapsed_secs;
    let records_per_span =
        grpc_phase.records_expected as f64 / grpc_phase.spans_accepted.max(1) as f64;
    let report = BenchReport {
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        machine: machine(),
        spans_per_request: args.spans_per_request,
        max_spans_per_sec_grpc: max_grpc,
        max_spans_per_sec_http: max_http,
        records_per_span,
        records_expected,
        records_in_postgres,
        peak_rss_mib: peak_rss,
        copy_reference_rows: copy_rows,
        copy_reference_rows_per_sec: copy_rps,
        end_to_end_rows_per_sec_grpc: e2e_rps,
        ratio_to_copy: e2e_rps / copy_rps,
        phases,
    };
    if let Some(dir) = args.report.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&args.report, serde_json::to_string_pretty(&report)?)?;
    print_summary(&report);
    eprintln!("full report: {}", args.report.display());
    if records_in_postgres as u64 != records_expected {
        bail!(
            "LOST OR EXTRA ROWS: {records_in_postgres} records in PostgreSQL, {records_expected} expected from accepted spans"
        );
    }
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!("{cpus} cores, {mem:.0} GiB; loadgen, service and PostgreSQL share them")
}

fn print_summary(r: &BenchReport) {
    println!(
        "\n| phase | target spans/s | accepted spans/s | refused spans | p50 ms | p99 ms | max ms | RSS start→end (max) MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for p in &r.phases {
        let x = &p.report;
        println!(
            "| {} | {} | {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.0}→{:.0} ({:.0}) |",
            p.name,
            x.target_spans_per_sec
                .map_or("max".into(), |t| format!("{t:.0}")),
            x.accepted_spans_per_sec,
            x.spans_refused,
            x.latency_p50_ms,
            x.latency_p99_ms,
            x.latency_max_ms,
            p.rss_start_mib,
            p.rss_end_mib,
            p.rss_max_mib
        );
    }
    println!(
        "\nmax sustained: grpc {:.0} spans/s, http/protobuf {:.0} spans/s ({:.2} records per span)\n\
         end to end (grpc): {:.0} rows/s; bare binary COPY of the same rows: {:.0} rows/s; ratio {:.2}\n\
         peak RSS of the service: {:.0} MiB\n\
         rows in PostgreSQL: {} / expected from accepted spans: {} ({})",
        r.max_spans_per_sec_grpc,
        r.max_spans_per_sec_http,
        r.records_per_span,
        r.end_to_end_rows_per_sec_grpc,
        r.copy_reference_rows_per_sec,
        r.ratio_to_copy,
        r.peak_rss_mib,
        r.records_in_postgres,
        r.records_expected,
        if r.records_in_postgres as u64 == r.records_expected {
            "none lost"
        } else {
            "MISMATCH"
        }
    );
}

//! `toolsight demo`: every alert kind fires and resolves in minutes. The service runs on a fresh
//! `toolsight_demo` database with the short-window demo rules, takes the incidents scenario on
//! its own OTLP/HTTP port, and each alert is printed as it fires and resolves.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use prost::Message;
use toolsight::config::Config;
use toolsight::demo::{Incidents, Phase};
use toolsight::{app, store};

/// The database the demo fills (dropped and created again at every start).
const DATABASE: &str = "toolsight_demo";

pub(super) async fn demo(
    mut config: Config,
    length: Duration,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let length = length.max(Duration::from_secs(30));
    // No PostgreSQL configured and none running: a private cluster, as `serve` does.
    let mut database = config.database.clone();
    let (cluster, database) = tokio::task::spawn_blocking(move || {
        store::cluster::start_if_wanted(&mut database).map(|c| (c, database))
    })
    .await??;
    config.database = database;
    let result = run(config, length, shutdown).await;
    if let Some(mut c) = cluster {
        tokio::task::spawn_blocking(move || c.stop()).await?;
    }
    result
}

async fn run(
    mut config: Config,
    length: Duration,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut url = url::Url::parse(&config.database.url).context("database.url")?;
    url.set_path(&format!("/{DATABASE}"));
    config.database.url = url.to_string();
    let opts = store::connect_options(&config.database.url)?;
    store::recreate_database(&opts)
        .await
        .with_context(|| format!("creating the {DATABASE} database"))?;
    let rules = std::env::temp_dir().join(format!("toolsight-demo-{}.yaml", std::process::id()));
    std::fs::write(&rules, toolsight::demo::DEMO_RULES)?;
    config.rules.enabled = true;
    config.rules.files = vec![rules.clone()];
    // Nobody is paged by a demo, and it runs beside a service already listening.
    config.notify = Default::default();
    let loopback = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    config.otlp.grpc_listen = loopback(0);
    config.otlp.http_listen = loopback(0);
    config.admin.listen = loopback(0);

    let listeners = app::Listeners::bind(&config).await?;
    let (_, http, admin) = listeners.addrs()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(app::run(config, listeners, async {
        let _ = stopped.await;
    }));
    let driven = tokio::select! {
        r = drive(http, admin, &opts, length) => r,
        _ = shutdown => {
            eprintln!("interrupted");
            Ok(())
        }
    };
    let _ = stop.send(());
    let served = service.await;
    std::fs::remove_file(&rules).ok();
    served??;
    driven
}

/// One alert's story in the demo.
#[derive(Default)]
struct Seen {
    fired: Option<f64>,
    resolved: Option<f64>,
    keys: std::collections::BTreeSet<String>,
}

async fn drive(
    http: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    opts: &sqlx::postgres::PgConnectOptions,
    length: Duration,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let patience = Instant::now() + Duration::from_secs(120);
    while client
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        anyhow::ensure!(
            Instant::now() < patience,
            "the service did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pool = store::query_pool(opts, 1).await?;
    let kinds: Vec<String> = toolsight::evaluate::rules::parse("demo", toolsight::demo::DEMO_RULES)
        .map_err(|e| anyhow::anyhow!("the demo rules: {e:?}"))?
        .groups
        .iter()
        .flat_map(|g| g.rules.iter().map(|r| r.alert.clone()))
        .collect();
    eprintln!(
        "toolsight demo: {} of traffic from a demo MCP server (healthy, then every incident the \
         rules catch, then healthy again) into the {DATABASE} database, {} alert rules evaluated \
         every 10 s; OTLP/HTTP on {http}, admin API on {admin}",
        humantime::format_duration(length),
        kinds.len()
    );
    // After the scenario, time for the last alerts to resolve.
    let settle = Duration::from_secs(90);
    let started = Instant::now();
    let mut scenario = Incidents::new((std::process::id() & 0xFFFF) as u16);
    let mut phase = None;
    let mut printed = 0;
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let at = started.elapsed();
        let running = at < length;
        if running {
            let now_phase = Phase::at(at, length);
            if phase != Some(now_phase) {
                phase = Some(now_phase);
                eprintln!("[{:>4}s] traffic: {}", at.as_secs(), now_phase.name());
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let body = scenario.second(now_phase, now).encode_to_vec();
            let sent = client
                .post(format!("http://{http}/v1/traces"))
                .header("content-type", "application/x-protobuf")
                .body(body)
                .send()
                .await;
            if let Err(e) = sent.and_then(|r| r.error_for_status()) {
                eprintln!("[{:>4}s] export refused: {e}", at.as_secs());
            }
        }
        let events = store::alerts::events(&pool).await?;
        for (alert, key, status, _, _) in events.iter().skip(printed) {
            let s = seen.entry(alert.clone()).or_default();
            let t = at.as_secs_f64();
            if status == "firing" {
                s.fired.get_or_insert(t);
                s.keys.insert(key.clone());
            } else {
                s.resolved = Some(t);
            }
            eprintln!(
                "[{:>4}s] {:<8} {alert} {key}",
                at.as_secs(),
                status.to_uppercase()
            );
        }
        printed = events.len();
        let all_resolved = !seen.is_empty()
            && kinds
                .iter()
                .all(|k| seen.get(k).is_some_and(|s| s.resolved.is_some()));
        if !running && (all_resolved || at >= length + settle) {
            break;
        }
    }
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
        .set_header(["alert", "fired after", "resolved after", "keys"]);
    let secs = |t: Option<f64>| t.map_or("-".to_owned(), |t| format!("{t:.0} s"));
    for kind in &kinds {
        let s = seen.get(kind);
        table.add_row([
            kind.clone(),
            secs(s.and_then(|s| s.fired)),
            secs(s.and_then(|s| s.resolved)),
            s.map_or(String::new(), |s| {
                s.keys.iter().cloned().collect::<Vec<_>>().join(", ")
            }),
        ]);
    }
    println!("{table}");
    let never: Vec<&String> = kinds.iter().filter(|k| !seen.contains_key(*k)).collect();
    if never.is_empty() {
        println!("every alert kind fired; the data stays in the {DATABASE} database");
    } else {
        println!("did not fire: {never:?} (a longer --duration gives the windows more data)");
    }
    Ok(())
}

//! The evaluator: per-group evaluation at an aligned `now` (queries through `store`, state
//! machine through `engine`), persistence, and the live loop with a single leader.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use super::engine::{Alerts, Notice, Tracked};
use super::observe::{self, Live, to_dt};
use super::rules::{Group, RuleFile};
use super::state::{AlertState, Event, Phase};
use crate::store::StoreError;
use crate::store::alerts::{self, NewEvent, StoredAlert};
use crate::store::window::Window;

/// The built-in rules, used when no rule files are configured.
pub const DEFAULT_RULES: &str = include_str!("../../alerts/default.yaml");

/// The configured rule files, or the built-in rules when none are configured.
pub fn load_rules(
    files: &[std::path::PathBuf],
) -> Result<Vec<(String, RuleFile)>, super::rules::RulesError> {
    if files.is_empty() {
        return super::rules::parse("(built-in) alerts/default.yaml", DEFAULT_RULES)
            .map(|f| vec![("(built-in) alerts/default.yaml".to_owned(), f)])
            .map_err(super::rules::RulesError::Invalid);
    }
    super::rules::load(files)
}

/// What one group keeps between evaluations: its alert states and the windows its rules read.
#[derive(Default)]
struct GroupRun {
    alerts: Alerts,
    window: Window,
}

/// Groups evaluate independently (each on its own schedule, in its own task in the live loop),
/// so each owns its states and windows.
type GroupState = std::sync::Arc<tokio::sync::Mutex<GroupRun>>;

pub struct Evaluator {
    pool: PgPool,
    groups: Vec<Group>,
    /// One per group, in the order of `groups`.
    states: Vec<GroupState>,
}

fn phase_of(s: &str) -> Phase {
    match s {
        "pending" => Phase::Pending,
        "firing" => Phase::Firing,
        "resolved" => Phase::Resolved,
        _ => Phase::Inactive,
    }
}

impl Evaluator {
    pub fn new(pool: PgPool, files: Vec<(String, RuleFile)>) -> Evaluator {
        let groups: Vec<Group> = files.into_iter().flat_map(|(_, f)| f.groups).collect();
        Evaluator {
            pool,
            states: groups.iter().map(|_| GroupState::default()).collect(),
            groups,
        }
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The group that holds rule `alert`.
    fn group_of(&self, alert: &str) -> Option<usize> {
        self.groups
            .iter()
            .position(|g| g.rules.iter().any(|r| r.alert == alert))
    }

    /// Replaces the rules. Alerts of rules that no longer exist are forgotten (and deleted from
    /// the stored state), so they do not stay firing forever; the others follow their rule.
    pub async fn replace_rules(
        &mut self,
        files: Vec<(String, RuleFile)>,
    ) -> Result<(), StoreError> {
        let mut tracked = Alerts::default();
        for s in &self.states {
            tracked.map.extend(s.lock().await.alerts.map.drain());
        }
        self.groups = files.into_iter().flat_map(|(_, f)| f.groups).collect();
        self.states = self.groups.iter().map(|_| GroupState::default()).collect();
        let mut deleted = Vec::new();
        for ((alert, key), t) in tracked.map {
            match self.group_of(&alert) {
                Some(g) => {
                    self.states[g]
                        .lock()
                        .await
                        .alerts
                        .map
                        .insert((alert, key), t);
                }
                None => deleted.push(StoredAlert::forgotten(&alert, &key, "")),
            }
        }
        let mut conn = self.pool.acquire().await?;
        alerts::save_evaluation(&mut conn, &deleted, &[], &[]).await
    }

    /// Loads the persisted alert states (after a restart, or on becoming the leader).
    pub async fn restore(&mut self) -> Result<usize, StoreError> {
        let rows = alerts::load_alerts(&self.pool).await?;
        for s in &self.states {
            *s.lock().await = GroupRun::default();
        }
        let mut restored = 0;
        for r in &rows {
            let Some(g) = self.group_of(&r.alert) else {
                continue;
            };
            restored += 1;
            self.states[g].lock().await.alerts.map.insert(
                (r.alert.clone(), r.key.clone()),
                Tracked {
                    group: r.group_name.clone(),
                    labels: r.labels.0.clone(),
                    state: AlertState {
                        phase: phase_of(&r.phase),
                        active_since_ms: r.active_since.map(|t| t.timestamp_millis()),
                        fired_at_ms: r.fired_at.map(|t| t.timestamp_millis()),
                        last_held_ms: r.last_held.map(|t| t.timestamp_millis()),
                        resolved_at_ms: r.resolved_at.map(|t| t.timestamp_millis()),
                        value: r.value,
                    },
                },
            );
        }
        Ok(restored)
    }

    /// Evaluates every group at `now` (tests and replays); the loop evaluates each group on its
    /// own aligned schedule through [`Evaluator::evaluate_group_at`].
    pub async fn evaluate_all_at(&mut self, now: DateTime<Utc>) -> Result<Vec<Notice>, StoreError> {
        let mut all = Vec::new();
        for g in 0..self.groups.len() {
            all.extend(self.evaluate_group_at(g, now).await?);
        }
        Ok(all)
    }

    /// Evaluates one group at `now` and saves its states, events and rule health in one
    /// transaction. A failing rule records its error and does not stop the others.
    pub async fn evaluate_group_at(
        &mut self,
        group: usize,
        now: DateTime<Utc>,
    ) -> Result<Vec<Notice>, StoreError> {
        evaluate_group(
            &self.pool,
            &self.groups[group],
            &self.states[group],
            now,
            None,
            None,
        )
        .await
    }
}

/// Evaluates `g` at the aligned instant `now` and saves the outcome. `late` is how long after
/// `now` the live loop started it: recorded in the rule health, so the evaluation time shown is
/// the one it really ran at.
async fn evaluate_group(
    pool: &PgPool,
    g: &Group,
    state: &GroupState,
    now: DateTime<Utc>,
    late: Option<chrono::Duration>,
    metrics: Option<&crate::metrics::Metrics>,
) -> Result<Vec<Notice>, StoreError> {
    let mut run = state.lock().await;
    let GroupRun {
        alerts: tracked,
        window,
    } = &mut *run;
    window.begin();
    let out = observe::evaluate_group(&mut Live { pool, window }, g, tracked, now).await;
    window.finish();
    if let Some(m) = metrics {
        m.rule_window_rows
            .get_or_create(&crate::metrics::GroupLabel {
                group: g.name.clone(),
            })
            .set(window.len() as i64);
    }
    if let Some(m) = metrics {
        for r in out.rules.iter().filter(|r| r.error.is_some()) {
            m.rule_failures
                .get_or_create(&crate::metrics::RuleLabel {
                    group: g.name.clone(),
                    alert: r.alert.clone(),
                })
                .inc();
        }
    }
    let (notices, changed) = (out.notices, out.changed);
    let ran_at = now + late.unwrap_or_default();
    let health: Vec<alerts::HealthUpdate> = out
        .rules
        .into_iter()
        .map(|r| (g.name.clone(), r.alert, r.error, ran_at, r.elapsed_ms))
        .collect();
    let states: Vec<StoredAlert> = changed
        .iter()
        .map(
            |(alert, key)| match tracked.map.get(&(alert.clone(), key.clone())) {
                Some(t) => StoredAlert {
                    alert: alert.clone(),
                    key: key.clone(),
                    group_name: t.group.clone(),
                    labels: sqlx::types::Json(t.labels.clone()),
                    phase: t.state.phase.as_str().to_owned(),
                    active_since: t.state.active_since_ms.map(to_dt),
                    fired_at: t.state.fired_at_ms.map(to_dt),
                    last_held: t.state.last_held_ms.map(to_dt),
                    resolved_at: t.state.resolved_at_ms.map(to_dt),
                    value: t.state.value,
                },
                None => StoredAlert::forgotten(alert, key, &g.name),
            },
        )
        .collect();
    let events: Vec<NewEvent> = notices
        .iter()
        .map(|n| {
            let (status, since, at) = match n.event {
                Event::Firing { since_ms, at_ms } => ("firing", since_ms, at_ms),
                Event::Resolved { since_ms, at_ms } => ("resolved", since_ms, at_ms),
            };
            NewEvent {
                alert: n.alert.clone(),
                key: n.key.clone(),
                labels: n.labels.clone(),
                annotations: n.annotations.clone(),
                status,
                value: n.value,
                threshold: n.threshold,
                since: to_dt(since),
                at: to_dt(at),
            }
        })
        .collect();
    let mut conn = pool.acquire().await?;
    alerts::save_evaluation(&mut conn, &states, &events, &health).await?;
    for n in &notices {
        tracing::info!(alert = %n.alert, key = %n.key, event = ?n.event, value = ?n.value, "alert state changed");
    }
    Ok(notices)
}

/// The next multiple of `interval` after `now` (evaluations happen on aligned instants).
fn next_tick(now: DateTime<Utc>, interval: Duration) -> DateTime<Utc> {
    let step = interval.as_millis().max(1) as i64;
    to_dt((now.timestamp_millis() / step + 1) * step)
}

/// Where the rules come from, for reloading: the configured files (empty: built-in rules) and
/// the copy the API shows.
pub struct RuleSource {
    pub files: Vec<std::path::PathBuf>,
    pub shared: SharedRules,
}

/// The rule files in force, each with its path: reloaded by the evaluator, read by the API.
pub type SharedRules = std::sync::Arc<std::sync::RwLock<Vec<(String, RuleFile)>>>;

/// The live loop: the replica holding the advisory lock evaluates each group on its interval;
/// the others wait and take over within a second or two of the leader's connection dying.
/// Rule files are re-read when they change; a file with problems keeps the previous rules.
pub async fn run(
    mut ev: Evaluator,
    opts: PgConnectOptions,
    source: RuleSource,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
) {
    let role = metrics
        .leader
        .get_or_create(&crate::metrics::RoleLabel { role: "evaluator" })
        .clone();
    let mut leader: Option<sqlx::PgConnection> = None;
    let mut due: HashMap<usize, DateTime<Utc>> = HashMap::new();
    // The group evaluations in flight, by group index.
    let mut running: HashMap<usize, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut watched = crate::watch::Watched::new(source.files.clone());
    let mut last_check = Instant::now();
    loop {
        if !watched.is_empty() && last_check.elapsed() >= crate::watch::EVERY {
            last_check = Instant::now();
            if watched.changed() {
                let loaded = load_rules(&source.files);
                metrics.reloaded("rules", loaded.is_ok());
                match loaded {
                    Ok(files) => {
                        if let Ok(mut shared) = source.shared.write() {
                            *shared = files.clone();
                        }
                        // The group indices change: let the running evaluations finish first.
                        finish(&mut running).await;
                        match ev.replace_rules(files).await {
                            Ok(()) => tracing::info!("rule files reloaded"),
                            Err(e) => {
                                tracing::warn!(error = %e, "rule files reloaded; forgetting removed alerts failed")
                            }
                        }
                        due.clear();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rule files changed but are invalid; keeping the previous rules")
                    }
                }
            }
        }
        if leader.is_none() {
            let conn = alerts::become_leader(&opts, "toolsight-evaluator").await;
            role.set(i64::from(conn.is_some()));
            if let Some(conn) = conn {
                match ev.restore().await {
                    Ok(n) => tracing::info!(alerts = n, "evaluating alert rules (leader)"),
                    Err(e) => tracing::warn!(error = %e, "restoring alert state failed"),
                }
                leader = Some(conn);
                due.clear();
            }
        } else if let Some(conn) = leader.as_mut() {
            // The lock lives with this connection: if it is gone, so is the leadership.
            if !alerts::connection_alive(conn).await {
                tracing::warn!("lost the evaluator lock connection; standing by");
                role.set(0);
                leader = None;
                for (_, h) in running.drain() {
                    h.abort();
                }
                continue;
            }
            let now = Utc::now();
            for (i, g) in ev.groups.iter().enumerate() {
                let at = *due.entry(i).or_insert_with(|| next_tick(now, g.interval));
                if now < at {
                    continue;
                }
                let label = crate::metrics::GroupLabel {
                    group: g.name.clone(),
                };
                // Each group in its own task: a slow group never delays another. A group still
                // running at its next instant skips that instant, counted.
                let busy = running.get(&i).is_some_and(|h| !h.is_finished());
                let next = next_tick(now, g.interval);
                let skipped = (now - at).num_milliseconds() / g.interval.as_millis().max(1) as i64;
                if busy {
                    metrics
                        .evaluations_missed
                        .get_or_create(&label)
                        .inc_by(1 + skipped as u64);
                    tracing::warn!(group = %g.name, at = %at, "rule group still evaluating its previous instant; this one is skipped");
                    due.insert(i, next);
                    continue;
                }
                if skipped > 0 {
                    metrics
                        .evaluations_missed
                        .get_or_create(&label)
                        .inc_by(skipped as u64);
                    tracing::warn!(group = %g.name, skipped, "rule group evaluations skipped: the evaluator was late");
                }
                // The latest instant due, not an old one: evaluating late data as of a past
                // instant would only delay the news.
                let at = next - chrono::Duration::milliseconds(g.interval.as_millis() as i64);
                let late = now - at;
                metrics
                    .evaluation_lag
                    .get_or_create(&label)
                    .set(late.num_milliseconds() as f64 / 1000.0);
                let (pool, group, state) = (ev.pool.clone(), g.clone(), ev.states[i].clone());
                let metrics = metrics.clone();
                running.insert(
                    i,
                    tokio::spawn(async move {
                        let started = std::time::Instant::now();
                        let result =
                            evaluate_group(&pool, &group, &state, at, Some(late), Some(&metrics))
                                .await;
                        metrics
                            .group_duration
                            .get_or_create(&label)
                            .set(started.elapsed().as_secs_f64());
                        match result {
                            Ok(_) => {
                                metrics
                                    .group_last_evaluation
                                    .get_or_create(&label)
                                    .set(at.timestamp_millis() as f64 / 1000.0);
                            }
                            Err(e) => {
                                tracing::warn!(group = %group.name, error = %e, "saving the evaluation failed");
                            }
                        }
                    }),
                );
                due.insert(i, next);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => {
                finish(&mut running).await;
                return;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Lets the group evaluations in flight finish; one still running after 10 s (stuck on a lock)
/// is dropped, its transaction rolled back.
async fn finish(running: &mut HashMap<usize, tokio::task::JoinHandle<()>>) {
    for (_, h) in running.drain() {
        let abort = h.abort_handle();
        if tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

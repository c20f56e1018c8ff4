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

pub struct Evaluator {
    pool: PgPool,
    groups: Vec<Group>,
    alerts: Alerts,
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
        Evaluator {
            pool,
            groups: files.into_iter().flat_map(|(_, f)| f.groups).collect(),
            alerts: Alerts::default(),
        }
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// Replaces the rules. Alerts of rules that no longer exist are forgotten (and deleted from
    /// the stored state), so they do not stay firing forever.
    pub async fn replace_rules(
        &mut self,
        files: Vec<(String, RuleFile)>,
    ) -> Result<(), StoreError> {
        self.groups = files.into_iter().flat_map(|(_, f)| f.groups).collect();
        let names: std::collections::HashSet<&str> = self
            .groups
            .iter()
            .flat_map(|g| &g.rules)
            .map(|r| r.alert.as_str())
            .collect();
        let gone: Vec<(String, String)> = self
            .alerts
            .map
            .keys()
            .filter(|(a, _)| !names.contains(a.as_str()))
            .cloned()
            .collect();
        let deleted: Vec<StoredAlert> = gone
            .iter()
            .map(|(alert, key)| StoredAlert::forgotten(alert, key, ""))
            .collect();
        for k in &gone {
            self.alerts.map.remove(k);
        }
        let mut conn = self.pool.acquire().await?;
        alerts::save_evaluation(&mut conn, &deleted, &[], &[]).await
    }

    /// Loads the persisted alert states (after a restart, or on becoming the leader).
    pub async fn restore(&mut self) -> Result<usize, StoreError> {
        let rows = alerts::load_alerts(&self.pool).await?;
        self.alerts = Alerts::default();
        for r in &rows {
            self.alerts.map.insert(
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
        Ok(rows.len())
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
        let g = self.groups[group].clone();
        let out = observe::evaluate_group(&mut Live(&self.pool), &g, &mut self.alerts, now).await;
        let (notices, changed) = (out.notices, out.changed);
        let health: Vec<alerts::HealthUpdate> = out
            .rules
            .into_iter()
            .map(|r| (g.name.clone(), r.alert, r.error, now, r.elapsed_ms))
            .collect();
        let states: Vec<StoredAlert> = changed
            .iter()
            .map(
                |(alert, key)| match self.alerts.map.get(&(alert.clone(), key.clone())) {
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
        let mut conn = self.pool.acquire().await?;
        alerts::save_evaluation(&mut conn, &states, &events, &health).await?;
        for n in &notices {
            tracing::info!(alert = %n.alert, key = %n.key, event = ?n.event, value = ?n.value, "alert state changed");
        }
        Ok(notices)
    }
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
    pub shared: std::sync::Arc<std::sync::RwLock<Vec<(String, RuleFile)>>>,
}

/// The files' modification times: a change triggers a reload.
fn stamps(files: &[std::path::PathBuf]) -> Vec<Option<std::time::SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

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
    let mut seen = stamps(&source.files);
    let mut last_check = Instant::now();
    loop {
        if !source.files.is_empty() && last_check.elapsed() >= Duration::from_secs(2) {
            last_check = Instant::now();
            let now_stamps = stamps(&source.files);
            if now_stamps != seen {
                seen = now_stamps;
                let loaded = load_rules(&source.files);
                metrics.reloaded("rules", loaded.is_ok());
                match loaded {
                    Ok(files) => {
                        if let Ok(mut shared) = source.shared.write() {
                            *shared = files.clone();
                        }
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
                continue;
            }
            let now = Utc::now();
            for (i, g) in ev.groups().to_vec().iter().enumerate() {
                let at = *due.entry(i).or_insert_with(|| next_tick(now, g.interval));
                if now >= at {
                    if let Err(e) = ev.evaluate_group_at(i, at).await {
                        tracing::warn!(group = %g.name, error = %e, "saving the evaluation failed");
                    }
                    due.insert(i, next_tick(Utc::now().max(at), g.interval));
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

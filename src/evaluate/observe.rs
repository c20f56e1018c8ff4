//! What a rule sees at `now`, and one group's evaluation, shared by the live evaluator (windows
//! read from PostgreSQL) and the backtest (windows computed from the stored history in memory).
//! Both call [`evaluate_group`]: the same baselines, the same engine, the same state machine.

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use sqlx::PgPool;

use super::engine::{self, Alerts, Notice};
use super::rules::{Baseline, Group, Kind, Rule};
use crate::evaluate::engine::Observation;
use crate::store::StoreError;
use crate::store::alerts;
use crate::store::window::Window;

/// The window aggregates the rule kinds read. Each returns one observation per key; the
/// windows are those of the SQL in `store::alerts` (rollup minutes in
/// `[trunc_minute(to - window), to)`, raw rows in `[to - window, to)`).
pub(crate) trait Windows {
    type Error: std::fmt::Display;

    /// A latency quantile (ms) per tool, with the same quantile over the window ending at
    /// `baseline_to` in `baseline`, and in `extra` its lower confidence bound: the quantile at
    /// rank `quantile - z·sqrt(quantile·(1 - quantile)/n)` (distribution-free; `z` = 0: the
    /// quantile itself).
    async fn latency(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
        quantile: f64,
        z: f64,
        baseline_to: Option<DateTime<Utc>>,
    ) -> Result<Vec<Observation>, Self::Error>;
    async fn error_rate(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
    ) -> Result<Vec<Observation>, Self::Error>;
    async fn empty_results(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
        baseline_to: DateTime<Utc>,
    ) -> Result<Vec<Observation>, Self::Error>;
    async fn retry_loops(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
        min_repeats: i64,
        after_errors_only: bool,
        polling_interval: Duration,
    ) -> Result<Vec<Observation>, Self::Error>;
    async fn token_burn(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
    ) -> Result<Vec<Observation>, Self::Error>;
    async fn rate_limit_headroom(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
    ) -> Result<Vec<Observation>, Self::Error>;
}

/// The live windows: the group's per-minute state, kept in memory and refreshed with what
/// changed (`store::window`); rate-limit headroom reads its few upstream rows directly.
pub(crate) struct Live<'a> {
    pub pool: &'a PgPool,
    pub window: &'a mut Window,
}

impl Windows for Live<'_> {
    type Error = StoreError;

    async fn latency(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
        quantile: f64,
        z: f64,
        baseline_to: Option<DateTime<Utc>>,
    ) -> Result<Vec<Observation>, StoreError> {
        let w = window.as_secs_f64();
        self.window
            .latency(self.pool, to, w, quantile, z, baseline_to)
            .await
    }
    async fn error_rate(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
    ) -> Result<Vec<Observation>, StoreError> {
        self.window
            .error_rate(self.pool, to, window.as_secs_f64())
            .await
    }
    async fn empty_results(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
        baseline_to: DateTime<Utc>,
    ) -> Result<Vec<Observation>, StoreError> {
        self.window
            .empty_results(self.pool, to, window.as_secs_f64(), baseline_to)
            .await
    }
    async fn retry_loops(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
        min_repeats: i64,
        after_errors_only: bool,
        polling_interval: Duration,
    ) -> Result<Vec<Observation>, StoreError> {
        self.window
            .retry_loops(
                self.pool,
                to,
                window.as_secs_f64(),
                min_repeats,
                after_errors_only,
                polling_interval.as_secs_f64(),
            )
            .await
    }
    async fn token_burn(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
    ) -> Result<Vec<Observation>, StoreError> {
        self.window
            .token_burn(self.pool, to, window.as_secs_f64())
            .await
    }
    async fn rate_limit_headroom(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
    ) -> Result<Vec<Observation>, StoreError> {
        alerts::rate_limit_headroom(self.pool, to, window.as_secs_f64()).await
    }
}

pub(crate) fn to_dt(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// One rule's observations at `now`, baselines included.
pub(crate) async fn observe<W: Windows>(
    w: &mut W,
    rule: &Rule,
    now: DateTime<Utc>,
) -> Result<Vec<Observation>, W::Error> {
    let window = rule.window;
    let window_ms = rule.window.as_millis() as i64;
    let now_ms = now.timestamp_millis();
    match &rule.kind {
        Kind::Latency(l) => {
            let baseline = l
                .regression
                .as_ref()
                .map(|r| to_dt(engine::baseline_end_ms(r.baseline, now_ms, window_ms)));
            let z = rule.confidence.map_or(0.0, engine::z_of);
            let mut obs = w.latency(now, window, l.quantile, z, baseline).await?;
            // `both`: the worse of the previous window and the same window a week ago.
            if l.regression
                .as_ref()
                .is_some_and(|r| r.baseline == Baseline::Both)
            {
                let week_end = to_dt(engine::baseline_end_ms(
                    Baseline::WeekAgo,
                    now_ms,
                    window_ms,
                ));
                let week = w
                    .latency(now, window, l.quantile, z, Some(week_end))
                    .await?;
                for o in &mut obs {
                    let b = week
                        .iter()
                        .find(|x| x.labels == o.labels)
                        .and_then(|x| x.baseline);
                    o.baseline = match (o.baseline, b) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
            Ok(obs)
        }
        Kind::ErrorRate(_) => w.error_rate(now, window).await,
        Kind::EmptyResults(e) => {
            let base = to_dt(engine::baseline_end_ms(e.baseline, now_ms, window_ms));
            w.empty_results(now, window, base).await
        }
        Kind::RetryLoop(r) => {
            w.retry_loops(
                now,
                window,
                r.min_repeats as i64,
                r.after_errors_only,
                r.polling_interval,
            )
            .await
        }
        Kind::TokenBurn(_) => w.token_burn(now, window).await,
        Kind::RateLimitHeadroom(_) => w.rate_limit_headroom(now, window).await,
    }
}

/// One rule's outcome in a group evaluation.
pub(crate) struct RuleOutcome {
    pub alert: String,
    pub error: Option<String>,
    pub elapsed_ms: f64,
}

/// A group evaluated at `now`: notices, the (alert, key) states that changed, per-rule outcomes.
pub(crate) struct GroupOutcome {
    pub notices: Vec<Notice>,
    pub changed: Vec<(String, String)>,
    pub rules: Vec<RuleOutcome>,
}

/// Evaluates every rule of `group` at `now` against `alerts`. A failing rule records its error
/// and does not stop the others.
pub(crate) async fn evaluate_group<W: Windows>(
    w: &mut W,
    group: &Group,
    alerts: &mut Alerts,
    now: DateTime<Utc>,
) -> GroupOutcome {
    let now_ms = now.timestamp_millis();
    let mut out = GroupOutcome {
        notices: Vec::new(),
        changed: Vec::new(),
        rules: Vec::new(),
    };
    for rule in &group.rules {
        let started = Instant::now();
        let error = match observe(w, rule, now).await {
            Ok(obs) => {
                out.notices.extend(engine::apply(
                    rule,
                    &group.name,
                    &obs,
                    alerts,
                    now_ms,
                    &mut out.changed,
                ));
                None
            }
            Err(e) => {
                tracing::warn!(group = %group.name, alert = %rule.alert, error = %e, "rule evaluation failed");
                Some(e.to_string())
            }
        };
        out.rules.push(RuleOutcome {
            alert: rule.alert.clone(),
            error,
            elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
        });
    }
    out.changed.sort();
    out.changed.dedup();
    out
}

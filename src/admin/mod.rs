//! The admin port: health, readiness, Prometheus metrics, and the JSON API: Prometheus's
//! shapes for `/api/v1/alerts` and `/api/v1/rules`, Alertmanager's API v2 (`alertmanager`) for
//! alerts and silences, toolsight's own `/api/v1/tools` and `/api/v1/silences`. Every JSON
//! field is camelCase.

pub mod alertmanager;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use sqlx::PgPool;

use crate::metrics::Metrics;
use crate::store;

/// The `[admin]` settings.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: std::net::SocketAddr,
    /// How often this service's own metrics are written to PostgreSQL (for the collector
    /// health dashboard); 0 turns it off.
    #[serde(with = "humantime_serde")]
    pub record_metrics_every: std::time::Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: ([127, 0, 0, 1], 9464).into(),
            record_metrics_every: std::time::Duration::from_secs(15),
        }
    }
}

#[derive(Clone)]
pub struct AdminState {
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    /// Background tasks that died (see `app::supervise`): the service is not ready.
    pub dead_tasks: DeadTasks,
    /// The loaded rule files, for `/api/v1/rules`.
    pub rules: crate::evaluate::run::SharedRules,
    /// Required on everything but `/healthz` and `/readyz` when set.
    pub admin_token: Option<crate::secret::Secret>,
    /// Routes and receivers, for the Alertmanager API's receivers and groups.
    pub notify: Arc<crate::notify::config::Notify>,
    /// When the service started (`/api/v2/status`).
    pub started: chrono::DateTime<chrono::Utc>,
}

pub fn router(state: AdminState) -> Router {
    let open = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/tools", get(tools))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/rules", get(rules))
        .route("/api/v1/silences", get(list_silences).post(add_silence))
        .route(
            "/api/v1/silences/{id}",
            axum::routing::delete(expire_silence),
        )
        .route("/api/v2/status", get(alertmanager::status))
        .route("/api/v2/alerts", get(alertmanager::alerts))
        .route("/api/v2/alerts/groups", get(alertmanager::groups))
        .route(
            "/api/v2/silences",
            get(alertmanager::list_silences).post(alertmanager::post_silence),
        )
        .route(
            "/api/v2/silence/{id}",
            get(alertmanager::get_silence).delete(alertmanager::delete_silence),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin_token,
        ));
    open.merge(guarded).with_state(state)
}

/// The admin token, when configured: `Authorization: Bearer <token>`, compared in constant time.
async fn require_admin_token(
    State(s): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(expected) = &s.admin_token else {
        return next.run(req).await;
    };
    let authorization = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let presented = crate::receive::auth::bearer(authorization);
    if !presented.is_some_and(|t| crate::receive::auth::same_token(t, expected.expose())) {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "the admin API needs its token: Authorization: Bearer <auth.admin_token>".into(),
        );
        resp.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer realm=\"toolsight-admin\""),
        );
        return resp;
    }
    next.run(req).await
}

/// The names of the background tasks that died.
pub type DeadTasks = Arc<std::sync::Mutex<Vec<&'static str>>>;

async fn readyz(State(s): State<AdminState>) -> Response {
    let dead = s
        .dead_tasks
        .lock()
        .map(|d| d.join(", "))
        .unwrap_or_default();
    if !dead.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: background task died: {dead}\n"),
        )
            .into_response();
    }
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: database unreachable\n",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct ToolsQuery {
    since: Option<String>,
}

/// Parses `15m`, `2h`, `7d` (humantime), bounded to 90 days.
pub fn parse_since(s: Option<&str>) -> Result<i64, String> {
    let s = s.unwrap_or("15m");
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("since={s:?}: {e}; use e.g. 15m, 2h, 7d"))?;
    if d.is_zero() || d.as_secs() > 90 * 86400 {
        return Err(format!("since={s:?}: must be between 1s and 90d"));
    }
    Ok(d.as_secs().max(1) as i64)
}

async fn tools(State(s): State<AdminState>, Query(q): Query<ToolsQuery>) -> Response {
    let since = match parse_since(q.since.as_deref()) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match store::queries::tool_summary(&s.pool, since).await {
        Ok(rows) => {
            let tools: Vec<ToolStats> = rows.into_iter().map(ToolStats::from).collect();
            axum::Json(serde_json::json!({ "sinceSeconds": since, "tools": tools })).into_response()
        }
        Err(e) => store_error(e),
    }
}

/// A row of `/api/v1/tools` (and `toolsight tools --json`): the API's own type, so the stored
/// columns can change without changing what clients read.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolStats {
    pub service: String,
    pub tool: String,
    pub side: String,
    pub calls: i64,
    pub errors: i64,
    pub cancellations: i64,
    /// Calls whose result content was captured (the denominator of `empty_results`).
    pub with_result: i64,
    pub empty_results: i64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Over the results whose size was known.
    pub mean_result_bytes: Option<f64>,
    /// Client calls whose server side is stored too.
    pub joined_calls: i64,
    /// Transport overhead (client duration minus server duration), mean over the joined calls.
    pub mean_overhead_ms: Option<f64>,
}

impl From<store::queries::ToolSummary> for ToolStats {
    fn from(t: store::queries::ToolSummary) -> Self {
        ToolStats {
            service: t.service,
            tool: t.tool,
            side: t.side,
            calls: t.calls,
            errors: t.errors,
            cancellations: t.cancellations,
            with_result: t.with_result,
            empty_results: t.empty_results,
            p50_ms: t.p50_ms,
            p95_ms: t.p95_ms,
            p99_ms: t.p99_ms,
            mean_result_bytes: t.mean_result_bytes,
            joined_calls: t.joined_calls,
            mean_overhead_ms: t.mean_overhead_ms,
        }
    }
}

/// A silence as the API shows it, with its state at `now`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SilenceView {
    pub id: i64,
    pub matchers: Vec<String>,
    pub starts_at: chrono::DateTime<chrono::Utc>,
    pub ends_at: chrono::DateTime<chrono::Utc>,
    pub created_by: String,
    pub comment: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// `pending`, `active` or `expired`.
    pub state: &'static str,
}

impl SilenceView {
    pub fn at(x: store::notify::Silence, now: chrono::DateTime<chrono::Utc>) -> SilenceView {
        let state = if x.ends_at <= now {
            "expired"
        } else if x.starts_at > now {
            "pending"
        } else {
            "active"
        };
        SilenceView {
            id: x.id,
            matchers: x.matchers.0,
            starts_at: x.starts_at,
            ends_at: x.ends_at,
            created_by: x.created_by,
            comment: x.comment,
            created_at: x.created_at,
            state,
        }
    }
}

fn store_error(e: store::StoreError) -> Response {
    let code = if e.is_retryable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    error(code, e.to_string())
}

/// A pending or firing alert, with the labels its notifications carry (the key's, the rule's
/// own such as `severity`, `alertname`: silences match against these).
pub(crate) struct ActiveAlert {
    pub alert: String,
    pub group: String,
    pub state: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// As its firing notification carried them (none while pending).
    pub annotations: std::collections::BTreeMap<String, String>,
    pub value: Option<f64>,
    pub active_since: Option<chrono::DateTime<chrono::Utc>>,
    pub fired_at: Option<chrono::DateTime<chrono::Utc>>,
    pub silenced_by: Vec<i64>,
}

async fn active_alerts(
    s: &AdminState,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<ActiveAlert>, Response> {
    let silenced = match crate::notify::run::Silenced::load(&s.pool, now).await {
        Ok(x) => x,
        Err(crate::notify::NotifyError::Store(e)) => return Err(store_error(e)),
        Err(e) => return Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    };
    let rows = store::alerts::load_alerts(&s.pool)
        .await
        .map_err(store_error)?;
    let mut annotations: std::collections::HashMap<(String, String), _> =
        store::alerts::firing_annotations(&s.pool)
            .await
            .map_err(store_error)?
            .into_iter()
            .map(|(alert, key, a)| ((alert, key), a.0))
            .collect();
    let rules = s.rules.read().map(|r| r.clone()).unwrap_or_default();
    Ok(rows
        .into_iter()
        .filter(|a| a.phase == "pending" || a.phase == "firing")
        .map(|a| {
            let mut labels = a.labels.0.clone();
            labels.extend(rule_labels(&rules, &a.group_name, &a.alert));
            labels.insert("alertname".into(), a.alert.clone());
            let silenced_by = silenced.by(&labels);
            ActiveAlert {
                annotations: if a.phase == "firing" {
                    annotations
                        .remove(&(a.alert.clone(), a.key.clone()))
                        .unwrap_or_default()
                } else {
                    Default::default()
                },
                alert: a.alert,
                group: a.group_name,
                state: a.phase,
                labels,
                value: a.value,
                active_since: a.active_since,
                fired_at: a.fired_at,
                silenced_by,
            }
        })
        .collect())
}

/// An alert as Prometheus's `/api/v1/alerts` and `/api/v1/rules` show it (`value` as text), with
/// toolsight's `firedAt`, `group`, `silenced` and `silencedBy` besides.
fn prometheus_alert(a: &ActiveAlert) -> serde_json::Value {
    serde_json::json!({
        "labels": a.labels, "annotations": a.annotations, "state": a.state,
        "activeAt": a.active_since, "value": a.value.map(|v| format!("{v:e}")),
        "firedAt": a.fired_at, "group": a.group,
        "silenced": !a.silenced_by.is_empty(), "silencedBy": a.silenced_by,
    })
}

/// Pending and firing alerts, as Prometheus lists them.
async fn alerts(State(s): State<AdminState>) -> Response {
    match active_alerts(&s, chrono::Utc::now()).await {
        Ok(active) => {
            let shown: Vec<_> = active.iter().map(prometheus_alert).collect();
            success(serde_json::json!({ "alerts": shown }))
        }
        Err(r) => r,
    }
}

/// The static labels of rule `alert` in group `group` (none when the rule is gone).
fn rule_labels(
    files: &[(String, crate::evaluate::rules::RuleFile)],
    group: &str,
    alert: &str,
) -> std::collections::BTreeMap<String, String> {
    files
        .iter()
        .flat_map(|(_, f)| &f.groups)
        .filter(|g| g.name == group)
        .flat_map(|g| &g.rules)
        .find(|r| r.alert == alert)
        .map(|r| r.labels.clone())
        .unwrap_or_default()
}

/// An error as Prometheus's API words it: `{"status": "error", "errorType", "error"}`.
fn error(code: StatusCode, message: String) -> Response {
    let kind = match code {
        StatusCode::BAD_REQUEST => "bad_data",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "internal",
    };
    (
        code,
        axum::Json(serde_json::json!({ "status": "error", "errorType": kind, "error": message })),
    )
        .into_response()
}

/// Prometheus's success envelope.
fn success(data: serde_json::Value) -> Response {
    axum::Json(serde_json::json!({ "status": "success", "data": data })).into_response()
}

/// A new silence: matchers, and a duration or an end time.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewSilence {
    pub matchers: Vec<String>,
    /// `2h`, `30m`; or give `endsAt`.
    pub duration: Option<String>,
    pub starts_at: Option<chrono::DateTime<chrono::Utc>>,
    pub ends_at: Option<chrono::DateTime<chrono::Utc>>,
    pub created_by: String,
    pub comment: String,
}

async fn add_silence(
    State(s): State<AdminState>,
    body: Result<axum::Json<NewSilence>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let axum::Json(n) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match create_silence(&s, n).await {
        Ok(silence) => {
            let shown = SilenceView::at(silence, chrono::Utc::now());
            (StatusCode::CREATED, axum::Json(shown)).into_response()
        }
        Err(r) => r,
    }
}

/// Checks and stores a silence (both APIs): every problem in one 400.
async fn create_silence(s: &AdminState, n: NewSilence) -> Result<store::notify::Silence, Response> {
    let mut problems = Vec::new();
    if n.matchers.is_empty() {
        problems.push("at least one matcher is required".to_owned());
    }
    for m in &n.matchers {
        if let Err(e) = m.parse::<crate::notify::route::Matcher>() {
            problems.push(e);
        }
    }
    if n.created_by.trim().is_empty() {
        problems.push("createdBy is required".into());
    }
    if n.comment.trim().is_empty() {
        problems.push("comment is required".into());
    }
    let starts = n.starts_at.unwrap_or_else(chrono::Utc::now);
    let ends = match (&n.duration, n.ends_at) {
        (Some(d), None) => match humantime::parse_duration(d) {
            Ok(d) => Some(starts + chrono::Duration::from_std(d).unwrap_or_default()),
            Err(e) => {
                problems.push(format!("duration {d:?}: {e}"));
                None
            }
        },
        (None, Some(t)) => Some(t),
        _ => {
            problems.push("give either duration or endsAt".into());
            None
        }
    };
    if let Some(e) = ends
        && e <= starts
    {
        problems.push("the silence ends before it starts".into());
    }
    if !problems.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, problems.join("; ")));
    }
    let ends = ends.unwrap_or(starts);
    match store::notify::create_silence(
        &s.pool,
        &n.matchers,
        starts,
        ends,
        &n.created_by,
        &n.comment,
    )
    .await
    {
        Ok(silence) => {
            tracing::info!(id = silence.id, matchers = ?n.matchers, until = %ends, by = %n.created_by, "silence created");
            Ok(silence)
        }
        Err(e) => Err(store_error(e)),
    }
}

/// Silences in force or to come, and those that ended in the last 24 hours.
async fn list_silences(State(s): State<AdminState>) -> Response {
    let now = chrono::Utc::now();
    match store::notify::silences(&s.pool, now - chrono::Duration::hours(24)).await {
        Ok(rows) => {
            let shown: Vec<SilenceView> =
                rows.into_iter().map(|x| SilenceView::at(x, now)).collect();
            axum::Json(serde_json::json!({ "silences": shown })).into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn expire_silence(
    State(s): State<AdminState>,
    axum::extract::Path(id): axum::extract::Path<i64>,
) -> Response {
    expire(&s, id, StatusCode::NO_CONTENT).await
}

/// Ends silence `id` now (both APIs): `done` when it did, 404 when no such silence is active.
async fn expire(s: &AdminState, id: i64, done: StatusCode) -> Response {
    match store::notify::expire_silence(&s.pool, id).await {
        Ok(true) => {
            tracing::info!(id, "silence expired");
            done.into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("no active silence with id {id}"),
        ),
        Err(e) => store_error(e),
    }
}

/// Rules as Prometheus's `/api/v1/rules` shows alerting rules (durations in seconds, times in
/// RFC 3339), each with its active alerts; toolsight's `kind`, `window` (seconds) and
/// `minSamples` besides. `query` describes the rule (toolsight rules are not PromQL).
async fn rules(State(s): State<AdminState>) -> Response {
    let health = match store::alerts::rule_health(&s.pool).await {
        Ok(h) => h,
        Err(e) => return store_error(e),
    };
    let active = match active_alerts(&s, chrono::Utc::now()).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let never = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    let loaded = s.rules.read().map(|r| r.clone()).unwrap_or_default();
    let groups: Vec<_> = loaded
        .iter()
        .flat_map(|(file, f)| f.groups.iter().map(move |g| (file, g)))
        .map(|(file, g)| {
            let mut group_seconds = 0.0;
            let mut group_last: Option<chrono::DateTime<chrono::Utc>> = None;
            let rules: Vec<_> = g
                .rules
                .iter()
                .map(|r| {
                    let h = health.iter().find(|h| h.0 == g.name && h.1 == r.alert);
                    let seconds = h.map_or(0.0, |h| h.5 / 1000.0);
                    group_seconds += seconds;
                    if let Some(h) = h {
                        group_last = group_last.max(Some(h.4));
                    }
                    let alerts: Vec<_> = active
                        .iter()
                        .filter(|a| a.group == g.name && a.alert == r.alert)
                        .collect();
                    let state = if alerts.iter().any(|a| a.state == "firing") {
                        "firing"
                    } else if alerts.is_empty() {
                        "inactive"
                    } else {
                        "pending"
                    };
                    let health = match h.map(|h| h.2.as_str()) {
                        Some("ok") => "ok",
                        Some("unknown") | None => "unknown",
                        Some(_) => "err",
                    };
                    serde_json::json!({
                        "type": "alerting", "name": r.alert, "state": state,
                        "query": format!("{} over {}", r.kind.name(), humantime::format_duration(r.window)),
                        "duration": r.for_.as_secs_f64(),
                        "keepFiringFor": r.keep_firing_for.as_secs_f64(),
                        "labels": r.labels, "annotations": r.annotations,
                        "alerts": alerts.iter().map(|a| prometheus_alert(a)).collect::<Vec<_>>(),
                        "health": health,
                        "lastError": h.and_then(|h| h.3.clone()).unwrap_or_default(),
                        "evaluationTime": seconds,
                        "lastEvaluation": h.map_or(never, |h| h.4),
                        "kind": r.kind.name(), "window": r.window.as_secs_f64(),
                        "minSamples": r.min_samples,
                    })
                })
                .collect();
            serde_json::json!({
                "name": g.name, "file": file, "interval": g.interval.as_secs_f64(), "limit": 0,
                "rules": rules, "evaluationTime": group_seconds,
                "lastEvaluation": group_last.unwrap_or(never),
            })
        })
        .collect();
    success(serde_json::json!({ "groups": groups }))
}

//! The admin port: health, readiness, Prometheus metrics, and the JSON API.

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

#[derive(Clone)]
pub struct AdminState {
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/tools", get(tools))
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> Response {
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
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({ "error": e })),
            )
                .into_response();
        }
    };
    match store::queries::tool_summary(&s.pool, since).await {
        Ok(rows) => {
            axum::Json(serde_json::json!({ "since_seconds": since, "tools": rows })).into_response()
        }
        Err(e) => {
            let code = if e.is_retryable() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            (
                code,
                axum::Json(serde_json::json!({ "error": e.to_string() })),
            )
                .into_response()
        }
    }
}

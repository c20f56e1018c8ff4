//! The collector's own metric samples, for dashboards that read only PostgreSQL.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;

/// Writes one sampling of (metric, labels, value) for `instance` at `at`.
pub(crate) async fn record(
    pool: &PgPool,
    at: DateTime<Utc>,
    instance: &str,
    samples: &[(String, String, f64)],
) -> Result<(), StoreError> {
    let (metrics, labels, values): (Vec<&str>, Vec<&str>, Vec<f64>) = samples.iter().fold(
        (Vec::new(), Vec::new(), Vec::new()),
        |(mut m, mut l, mut v), (a, b, c)| {
            m.push(a.as_str());
            l.push(b.as_str());
            v.push(*c);
            (m, l, v)
        },
    );
    sqlx::query(
        "INSERT INTO collector_metrics (at, instance, metric, labels, value)
         SELECT $1, $2, m, l, v FROM unnest($3::text[], $4::text[], $5::float8[]) AS x(m, l, v)",
    )
    .bind(at)
    .bind(instance)
    .bind(metrics)
    .bind(labels)
    .bind(values)
    .execute(pool)
    .await?;
    Ok(())
}

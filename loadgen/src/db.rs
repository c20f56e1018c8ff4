//! Database side of `toolsight-bench`: fresh databases, row counts, and the bare-COPY reference
//! (the service's own COPY encoding, `toolsight::store::copy`, without its staging, conflict
//! handling and rollups).

use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgPool};

use anyhow::Context;
use toolsight::normalize::Normalized;

/// Drops and recreates `name` on the server `opts` points at; returns its options.
pub async fn recreate_database(
    opts: &PgConnectOptions,
    name: &str,
) -> anyhow::Result<PgConnectOptions> {
    let opts = opts.clone().database(name);
    toolsight::store::recreate_database(&opts).await?;
    Ok(opts)
}

/// Records in the raw tables (every record kind).
pub async fn count_records(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM tool_calls) + (SELECT count(*) FROM mcp_requests)
              + (SELECT count(*) FROM llm_calls) + (SELECT count(*) FROM upstream_calls)",
    )
    .fetch_one(pool)
    .await?)
}

/// The reference ceiling: the same records written by plain binary COPY straight into the raw
/// tables (same schema and indexes, no staging, no conflict handling, no rollups), over
/// `connections` connections in parallel. Returns (rows, time).
pub async fn copy_reference(
    pool: &PgPool,
    batches: Vec<Normalized>,
    connections: usize,
) -> anyhow::Result<(u64, Duration)> {
    let rows: u64 = batches.iter().map(|b| b.records() as u64).sum();
    let per = batches.len().div_ceil(connections.max(1)).max(1);
    let mut chunks: Vec<Vec<Normalized>> = Vec::new();
    let mut it = batches.into_iter().peekable();
    while it.peek().is_some() {
        chunks.push(it.by_ref().take(per).collect());
    }
    let started = Instant::now();
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut conn = pool.acquire().await?;
                // Batches of about 10k rows, as the writers use.
                for group in chunk.chunks(10) {
                    let bufs = toolsight::store::copy::encode_records(group);
                    let mut tx = conn.begin().await?;
                    for (buf, table) in bufs.into_iter().zip([
                        "tool_calls",
                        "mcp_requests",
                        "llm_calls",
                        "upstream_calls",
                    ]) {
                        if buf.rows() == 0 {
                            continue;
                        }
                        let mut sink = tx
                            .copy_in_raw(&format!("COPY {table} FROM STDIN (FORMAT binary)"))
                            .await?;
                        sink.send(buf.finish()).await?;
                        sink.finish().await?;
                    }
                    tx.commit().await?;
                }
                Ok::<(), sqlx::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.context("copy task failed")?.context("copy")?;
    }
    Ok((rows, started.elapsed()))
}

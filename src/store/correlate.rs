//! Joining what belongs to one call after it is stored. The client and server spans of one tool
//! call come from different processes, in different exports, seconds apart and in any order; the
//! MCP SDK's `MCP send` span nested in FastMCP's client span may travel in an export of its own.
//! After every committed batch, the writer reads the stored calls of the batch's traces, decides
//! here (pure: [`resolve_tools`], [`resolve_methods`]) what each row should say, and writes only
//! the differences, with the rollup deltas they imply, in one transaction.
//!
//! Exactly once: the rows of a trace with something to change are read again `FOR UPDATE` and
//! the changes computed from what is then stored, so a second join of the same rows (another
//! writer, a retried export, after a restart) finds nothing left to change. Pairs that arrive in
//! the same batch are joined before they are written ([`prejoin`]), so the join after the
//! commit usually only reads. Two sides committed at the same time by two writers are joined by
//! whichever writer reads last: each reads after its own commit.

use std::collections::{HashMap, HashSet};

use sqlx::{PgConnection, Row};

use super::StoreError;
use super::rollup::Rollups;
use crate::normalize::{Normalized, Outcome, Side, ToolCall};

type SpanId = [u8; 8];
type TraceId = [u8; 16];

/// What the join decides for a stored tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolState {
    /// False for a client span nested in another client span of the same call.
    pub counted: bool,
    /// The call's outcome: the worst of what its spans reported.
    pub outcome: Outcome,
    pub error_type: Option<String>,
    pub tool: String,
    pub peer: Option<SpanId>,
    /// Client rows: client duration minus server duration.
    pub overhead_us: Option<i64>,
    /// Counted by the retry-loop rule ([`loop_counted`]).
    pub loop_counted: bool,
}

/// A stored tool call, as the join and the rollups need it.
#[derive(Debug, Clone)]
pub struct ToolRow {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub inner: Option<SpanId>,
    pub client: bool,
    /// What this side reported.
    pub own: Outcome,
    pub request_id: Option<String>,
    pub service: String,
    pub start_unix_nanos: i64,
    pub duration_us: i64,
    pub result_bytes: Option<i64>,
    pub result_items: Option<i32>,
    pub result_empty: Option<bool>,
    pub session_key: String,
    /// Empty where arguments were not captured.
    pub args_hash: Vec<u8>,
    pub state: ToolState,
}

/// A stored client MCP request other than `tools/call`.
#[derive(Debug, Clone)]
pub struct MethodRow {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub method: String,
    pub service: String,
    pub start_unix_nanos: i64,
    pub duration_us: i64,
    pub error: bool,
    pub orphan: bool,
    pub counted: bool,
}

pub(crate) const UNKNOWN_TOOL: &str = "(unknown)";

fn severity(o: Outcome) -> u8 {
    match o {
        Outcome::Ok => 0,
        Outcome::Error => 1,
        Outcome::Cancelled => 2,
    }
}

fn worst(a: Outcome, b: Outcome) -> Outcome {
    if severity(b) > severity(a) { b } else { a }
}

/// Whether the retry-loop rule counts a call: the raw-row definition `store::alerts::LOOP_CALLS`
/// as a function of what the row says. A call is one call: a nested client span is not
/// counted, and a server row counts only where it has no client side (no joined peer, and no
/// client row of the same tool in its trace). Where the arguments are not captured, only
/// failed or empty calls count ("the same call again" cannot be told from "another call").
pub(crate) fn loop_counted(
    client: bool,
    state: &ToolState,
    has_args: bool,
    result_empty: Option<bool>,
    client_of_tool_in_trace: bool,
) -> bool {
    state.counted
        && (client || (state.peer.is_none() && !client_of_tool_in_trace))
        && (has_args || state.outcome != Outcome::Ok || result_empty == Some(true))
}

/// [`loop_counted`] for every row of one trace in the states the join decided.
fn set_loop_counted(rows: &[ToolRow], states: &mut [ToolState]) {
    let client_tools: HashSet<String> = rows
        .iter()
        .zip(states.iter())
        .filter(|(r, _)| r.client)
        .map(|(_, s)| s.tool.clone())
        .collect();
    for (r, s) in rows.iter().zip(states.iter_mut()) {
        s.loop_counted = loop_counted(
            r.client,
            s,
            !r.args_hash.is_empty(),
            r.result_empty,
            client_tools.contains(&s.tool),
        );
    }
}

/// The state every row of one trace should have (rows of one trace, in any order). Pure.
pub(crate) fn resolve_tools(rows: &[ToolRow]) -> Vec<ToolState> {
    let mut states = resolve_joins(rows);
    set_loop_counted(rows, &mut states);
    states
}

fn resolve_joins(rows: &[ToolRow]) -> Vec<ToolState> {
    let by_id: HashMap<SpanId, usize> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.span_id, i))
        .collect();
    // A client span whose parent is a client span of the same tool is nested in it.
    let outer_of = |i: usize| -> Option<usize> {
        let r = &rows[i];
        let p = by_id.get(&r.parent?).copied()?;
        let same_tool = rows[p].state.tool == r.state.tool
            || r.state.tool == UNKNOWN_TOOL
            || rows[p].state.tool == UNKNOWN_TOOL;
        (r.client && rows[p].client && p != i && same_tool).then_some(p)
    };
    // The outermost client span of each client row (bounded: nesting is one or two levels).
    let root = |mut i: usize| -> usize {
        for _ in 0..4 {
            match outer_of(i) {
                Some(p) => i = p,
                None => break,
            }
        }
        i
    };
    // A nested span is only a link: it counts nowhere and is nobody's peer (it may have been,
    // while it was stored without the span around it).
    let mut states: Vec<ToolState> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if r.client && outer_of(i).is_some() {
                ToolState {
                    counted: false,
                    outcome: r.own,
                    peer: None,
                    overhead_us: None,
                    ..r.state.clone()
                }
            } else {
                r.state.clone()
            }
        })
        .collect();
    // Every id a server span's parent may have for each counted client call: its own, the
    // nested span kept on it, and its stored nested rows'.
    let mut link_to_client: HashMap<SpanId, usize> = HashMap::new();
    let mut request_ids: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, r) in rows.iter().enumerate().filter(|(_, r)| r.client) {
        let c = root(i);
        // A link whose call has not arrived yet pairs with nothing.
        if !states[c].counted {
            continue;
        }
        link_to_client.insert(r.span_id, c);
        if let Some(inner) = r.inner {
            link_to_client.insert(inner, c);
        }
        if let Some(id) = r.request_id.as_deref() {
            let v = request_ids.entry(id).or_default();
            if !v.contains(&c) {
                v.push(c);
            }
        }
    }
    // Servers in start order, so the first attempt of a call is its pair.
    let mut servers: Vec<usize> = (0..rows.len()).filter(|&i| !rows[i].client).collect();
    servers.sort_by_key(|&i| (rows[i].start_unix_nanos, rows[i].span_id));
    let mut paired: HashSet<usize> = HashSet::new();
    for v in servers {
        let server = &rows[v];
        let by_parent = server.parent.and_then(|p| link_to_client.get(&p).copied());
        let by_request = || {
            let cands = request_ids.get(server.request_id.as_deref()?)?;
            let tool_fits = |c: &usize| {
                server.state.tool == UNKNOWN_TOOL || rows[*c].state.tool == server.state.tool
            };
            let mut fitting = cands.iter().filter(|c| tool_fits(c));
            let only = *fitting.next()?;
            fitting.next().is_none().then_some(only)
        };
        let Some(c) = by_parent.or_else(by_request) else {
            continue;
        };
        if !paired.insert(c) {
            continue;
        }
        let client = &rows[c];
        // The call's outcome: what either side, or a span nested on the client side, saw.
        let nested_worst = rows
            .iter()
            .enumerate()
            .filter(|&(i, r)| r.client && i != c && root(i) == c)
            .fold(Outcome::Ok, |w, (_, r)| worst(w, r.own));
        let outcome = worst(worst(client.own, server.own), nested_worst);
        let tool = if client.state.tool != UNKNOWN_TOOL {
            client.state.tool.clone()
        } else {
            server.state.tool.clone()
        };
        let error = |mine: &Option<String>, theirs: &Option<String>| {
            (outcome != Outcome::Ok)
                .then(|| mine.clone().or_else(|| theirs.clone()))
                .flatten()
        };
        let (client_error, server_error) = (
            error(&client.state.error_type, &server.state.error_type),
            error(&server.state.error_type, &client.state.error_type),
        );
        let completed = client.own != Outcome::Cancelled && server.own != Outcome::Cancelled;
        let cs = &mut states[c];
        cs.outcome = outcome;
        cs.error_type = client_error;
        cs.tool = tool.clone();
        cs.peer = Some(server.span_id);
        cs.overhead_us = completed.then(|| (client.duration_us - server.duration_us).max(0));
        let vs = &mut states[v];
        vs.outcome = outcome;
        vs.error_type = server_error;
        vs.tool = tool;
        vs.peer = Some(client.span_id);
    }
    states
}

impl ToolRow {
    /// A record about to be written, as the join sees a stored row.
    pub fn of(c: &ToolCall) -> ToolRow {
        ToolRow {
            trace_id: c.span.trace_id,
            span_id: c.span.span_id,
            parent: c.span.parent_span_id,
            inner: c.inner_span_id,
            client: c.side == Side::Client,
            own: c.own_outcome.unwrap_or(c.outcome),
            request_id: c.request_id.clone(),
            service: c.span.service.clone(),
            start_unix_nanos: c.span.start_unix_nanos,
            duration_us: c.span.duration_us,
            result_bytes: c.result.and_then(|r| r.bytes),
            result_items: c.result.and_then(|r| r.items),
            result_empty: c.result.map(|r| r.empty),
            session_key: c.session_key.clone(),
            args_hash: c.args_hash.map(|h| h.to_vec()).unwrap_or_default(),
            state: ToolState {
                counted: c.counted,
                outcome: c.outcome,
                error_type: c.error_type.clone(),
                tool: c.tool.clone(),
                peer: c.peer_span_id,
                overhead_us: c.overhead_us,
                loop_counted: c.loop_counted,
            },
        }
    }
}

/// Joins the calls of one batch among themselves before they are written: the two sides of a
/// call that arrive together (one process traced on both sides, or two exports in one batch)
/// are written joined, and the join after the commit finds nothing to change for them.
///
/// Returns the traces whose calls are complete within the batch (every counted call joined with
/// its other side, every uncounted one nested in a call of the batch): once all of the batch's
/// rows are stored as new, nothing stored before can change them, and the join after the commit
/// need not read them.
pub(crate) fn prejoin<'a>(
    batches: impl IntoIterator<Item = &'a mut Normalized>,
) -> HashSet<TraceId> {
    let mut complete = HashSet::new();
    let mut calls: Vec<&mut ToolCall> = batches
        .into_iter()
        .flat_map(|n| n.tool_calls.iter_mut())
        .collect();
    calls.sort_by_key(|c| c.span.trace_id);
    for group in calls.chunk_by_mut(|a, b| a.span.trace_id == b.span.trace_id) {
        if let [c] = group {
            // Alone in its trace (in this batch): nothing to join, only the loop flag to set.
            let client = c.side == Side::Client;
            let state = ToolState {
                counted: c.counted,
                outcome: c.outcome,
                error_type: None,
                tool: String::new(),
                peer: c.peer_span_id,
                overhead_us: None,
                loop_counted: false,
            };
            let empty = c.result.map(|r| r.empty);
            c.loop_counted = loop_counted(client, &state, c.args_hash.is_some(), empty, client);
            continue;
        }
        let rows: Vec<ToolRow> = group.iter().map(|c| ToolRow::of(c)).collect();
        let states = resolve_tools(&rows);
        let ids: HashSet<SpanId> = rows.iter().map(|r| r.span_id).collect();
        if rows.iter().zip(&states).all(|(r, s)| {
            (s.counted && s.peer.is_some())
                || (!s.counted && r.parent.is_some_and(|p| ids.contains(&p)))
        }) {
            complete.insert(rows[0].trace_id);
        }
        for ((c, row), s) in group.iter_mut().zip(&rows).zip(states) {
            c.own_outcome = (row.own != s.outcome).then_some(row.own);
            c.counted = s.counted;
            c.outcome = s.outcome;
            c.error_type = s.error_type;
            c.tool = s.tool;
            c.peer_span_id = s.peer;
            c.overhead_us = s.overhead_us;
            c.loop_counted = s.loop_counted;
        }
    }
    complete
}

/// Which client requests of one trace are nested in another of the same method. Pure.
pub(crate) fn resolve_methods(rows: &[MethodRow]) -> Vec<bool> {
    let by_id: HashMap<SpanId, &MethodRow> = rows.iter().map(|r| (r.span_id, r)).collect();
    rows.iter()
        .map(|r| {
            !r.parent
                .and_then(|p| by_id.get(&p))
                .is_some_and(|p| p.method == r.method && p.span_id != r.span_id)
        })
        .collect()
}

/// The traces of a batch that may hold something to join: its tool calls, and its client MCP
/// requests (a nested `MCP send` may arrive before or after the span it is nested in).
pub(crate) fn traces_of<'a>(
    batches: impl IntoIterator<Item = &'a Normalized>,
    complete: &HashSet<TraceId>,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut tools: HashSet<TraceId> = HashSet::new();
    let mut methods: HashSet<TraceId> = HashSet::new();
    for n in batches {
        tools.extend(
            n.tool_calls
                .iter()
                .map(|c| c.span.trace_id)
                .filter(|t| !complete.contains(t)),
        );
        methods.extend(
            n.mcp_requests
                .iter()
                .filter(|m| m.side == crate::normalize::Side::Client)
                .map(|m| m.span.trace_id),
        );
    }
    let sorted = |s: HashSet<TraceId>| {
        let mut v: Vec<Vec<u8>> = s.into_iter().map(|t| t.to_vec()).collect();
        v.sort();
        v
    };
    (sorted(tools), sorted(methods))
}

fn outcome_of(s: &str) -> Outcome {
    match s {
        "error" => Outcome::Error,
        "cancelled" => Outcome::Cancelled,
        _ => Outcome::Ok,
    }
}

fn id<const N: usize>(b: Option<Vec<u8>>) -> Option<[u8; N]> {
    b.and_then(|b| b.try_into().ok())
}

/// What one join changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Joined {
    /// Client/server pairs newly joined.
    pub pairs: u64,
    /// Client spans newly found nested in another (left out of the rollups from now on).
    pub nested: u64,
}

/// Joins the stored calls of these traces and merges the rollup changes into `shard`, in the
/// caller's transaction.
pub(crate) async fn join(
    conn: &mut PgConnection,
    tool_traces: &[Vec<u8>],
    method_traces: &[Vec<u8>],
    batch_rows: Option<&HashMap<Vec<u8>, i64>>,
    shard: i16,
) -> Result<Joined, StoreError> {
    // When every row of the batch was new, a trace holding no more rows than the batch wrote
    // (one side only, nothing before it) has nothing to join: only the others are read.
    let narrowed;
    let tool_traces = match batch_rows {
        Some(batch) if !tool_traces.is_empty() => {
            let stored: Vec<(Vec<u8>, i64)> = sqlx::query_as(
                "SELECT trace_id, count(*) FROM tool_calls WHERE trace_id = ANY($1) GROUP BY 1",
            )
            .bind(tool_traces)
            .fetch_all(&mut *conn)
            .await?;
            narrowed = stored
                .into_iter()
                .filter(|(t, n)| batch.get(t).is_none_or(|b| n > b))
                .map(|(t, _)| t)
                .collect::<Vec<_>>();
            narrowed.as_slice()
        }
        _ => tool_traces,
    };
    // Optimistic: read without locks; almost always nothing changes (one side only, or both
    // sides joined before they were written). Only traces with something to change are read
    // again under row locks, and the changes recomputed from what is then stored.
    let tools = load_tools(conn, tool_traces, false).await?;
    let methods = load_methods(conn, method_traces, false).await?;
    let (tool_changes, method_changes) = changes(&tools, &methods);
    if tool_changes.is_empty() && method_changes.is_empty() {
        return Ok(Joined::default());
    }
    let traces_of = |ids: Vec<TraceId>| {
        let mut v: Vec<Vec<u8>> = ids.into_iter().map(|t| t.to_vec()).collect();
        v.sort();
        v.dedup();
        v
    };
    let tool_traces = traces_of(tool_changes.iter().map(|(r, _)| r.trace_id).collect());
    let method_traces = traces_of(method_changes.iter().map(|r| r.trace_id).collect());
    let tools = load_tools(conn, &tool_traces, true).await?;
    let methods = load_methods(conn, &method_traces, true).await?;
    let (tool_changes, method_changes) = changes(&tools, &methods);
    let mut joined = Joined::default();
    for (row, state) in &tool_changes {
        joined.pairs += u64::from(!row.client && row.state.peer.is_none() && state.peer.is_some());
        joined.nested += u64::from(row.state.counted && !state.counted);
    }
    joined.nested += method_changes.len() as u64;
    if tool_changes.is_empty() && method_changes.is_empty() {
        return Ok(joined);
    }
    let mut rollups = Rollups::default();
    for (row, state) in &tool_changes {
        rollups.add_tool_row(row, &row.state, -1);
        rollups.add_tool_row(row, state, 1);
    }
    for row in &method_changes {
        rollups.add_method_row(row, -1);
    }
    update_tools(conn, &tool_changes).await?;
    update_methods(conn, &method_changes).await?;
    super::writer::merge_rollup_deltas(conn, rollups, shard).await?;
    Ok(joined)
}

/// What the stored rows of these traces should say and do not.
fn changes<'a>(
    tools: &'a [ToolRow],
    methods: &'a [MethodRow],
) -> (Vec<(&'a ToolRow, ToolState)>, Vec<&'a MethodRow>) {
    let mut tool_changes = Vec::new();
    for trace in tools.chunk_by(|a, b| a.trace_id == b.trace_id) {
        if trace.len() < 2 {
            continue;
        }
        for (row, state) in trace.iter().zip(resolve_tools(trace)) {
            if state != row.state {
                tool_changes.push((row, state));
            }
        }
    }
    let mut method_changes = Vec::new();
    for trace in methods.chunk_by(|a, b| a.trace_id == b.trace_id) {
        for (row, counted) in trace.iter().zip(resolve_methods(trace)) {
            // A nested request once found stays nested.
            if row.counted && !counted {
                method_changes.push(row);
            }
        }
    }
    (tool_changes, method_changes)
}

macro_rules! tools_sql {
    () => {
        "SELECT trace_id, span_id, parent_span_id, inner_span_id, side, outcome, own_outcome,
                error_type, request_id, service,
                (extract(epoch FROM start_time) * 1000000)::int8 AS start_us, duration_us,
                result_bytes, result_items, result_empty, tool, counted, peer_span_id, overhead_us,
                session_key, coalesce(args_hash, '\\x'::bytea) AS args_hash, loop_counted
         FROM tool_calls WHERE trace_id = ANY($1)
         ORDER BY trace_id, span_id"
    };
}
const TOOLS: &str = tools_sql!();
const TOOLS_LOCKED: &str = concat!(tools_sql!(), " FOR UPDATE");

macro_rules! methods_sql {
    () => {
        "SELECT trace_id, span_id, parent_span_id, method, service,
                (extract(epoch FROM start_time) * 1000000)::int8, duration_us, outcome, orphan, counted
         FROM mcp_requests WHERE trace_id = ANY($1) AND side = 'client'
         ORDER BY trace_id, span_id"
    };
}
const METHODS: &str = methods_sql!();
const METHODS_LOCKED: &str = concat!(methods_sql!(), " FOR UPDATE");

async fn load_tools(
    conn: &mut PgConnection,
    traces: &[Vec<u8>],
    lock: bool,
) -> Result<Vec<ToolRow>, StoreError> {
    if traces.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(if lock { TOOLS_LOCKED } else { TOOLS })
        .bind(traces)
        .fetch_all(&mut *conn)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let outcome = outcome_of(r.try_get::<&str, _>("outcome")?);
        let own: Option<&str> = r.try_get("own_outcome")?;
        let (Some(trace_id), Some(span_id)) =
            (id(r.try_get("trace_id")?), id(r.try_get("span_id")?))
        else {
            continue;
        };
        out.push(ToolRow {
            trace_id,
            span_id,
            parent: id(r.try_get("parent_span_id")?),
            inner: id(r.try_get("inner_span_id")?),
            client: r.try_get::<&str, _>("side")? == "client",
            own: own.map_or(outcome, outcome_of),
            request_id: r.try_get("request_id")?,
            service: r.try_get("service")?,
            start_unix_nanos: r.try_get::<i64, _>("start_us")?.saturating_mul(1000),
            duration_us: r.try_get("duration_us")?,
            result_bytes: r.try_get("result_bytes")?,
            result_items: r.try_get("result_items")?,
            result_empty: r.try_get("result_empty")?,
            session_key: r.try_get("session_key")?,
            args_hash: r.try_get("args_hash")?,
            state: ToolState {
                counted: r.try_get("counted")?,
                outcome,
                error_type: r.try_get("error_type")?,
                tool: r.try_get("tool")?,
                peer: id(r.try_get("peer_span_id")?),
                overhead_us: r.try_get("overhead_us")?,
                loop_counted: r.try_get("loop_counted")?,
            },
        });
    }
    Ok(out)
}

async fn load_methods(
    conn: &mut PgConnection,
    traces: &[Vec<u8>],
    lock: bool,
) -> Result<Vec<MethodRow>, StoreError> {
    if traces.is_empty() {
        return Ok(Vec::new());
    }
    #[allow(clippy::type_complexity)]
    let rows: Vec<(
        Vec<u8>,
        Vec<u8>,
        Option<Vec<u8>>,
        String,
        String,
        i64,
        i64,
        String,
        bool,
        bool,
    )> = sqlx::query_as(if lock { METHODS_LOCKED } else { METHODS })
        .bind(traces)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            Some(MethodRow {
                trace_id: r.0.try_into().ok()?,
                span_id: r.1.try_into().ok()?,
                parent: id(r.2),
                method: r.3,
                service: r.4,
                start_unix_nanos: r.5.saturating_mul(1000),
                duration_us: r.6,
                error: r.7 != "ok",
                orphan: r.8,
                counted: r.9,
            })
        })
        .collect())
}

async fn update_tools(
    conn: &mut PgConnection,
    changes: &[(&ToolRow, ToolState)],
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut traces = Vec::new();
    let mut spans = Vec::new();
    let mut counted = Vec::new();
    let mut outcomes = Vec::new();
    let mut owns: Vec<Option<&str>> = Vec::new();
    let mut errors = Vec::new();
    let mut tools = Vec::new();
    let mut peers: Vec<Option<Vec<u8>>> = Vec::new();
    let mut overheads = Vec::new();
    let mut loops = Vec::new();
    for (row, s) in changes {
        traces.push(row.trace_id.to_vec());
        spans.push(row.span_id.to_vec());
        counted.push(s.counted);
        outcomes.push(s.outcome.as_str());
        owns.push((row.own != s.outcome).then_some(row.own.as_str()));
        errors.push(s.error_type.clone());
        tools.push(s.tool.clone());
        peers.push(s.peer.map(|p| p.to_vec()));
        overheads.push(s.overhead_us);
        loops.push(s.loop_counted);
    }
    sqlx::query(
        "UPDATE tool_calls t SET counted = u.counted, outcome = u.outcome,
                own_outcome = u.own_outcome, error_type = u.error_type, tool = u.tool,
                peer_span_id = u.peer, overhead_us = u.overhead, loop_counted = u.loop_counted
         FROM unnest($1::bytea[], $2::bytea[], $3::bool[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::bytea[], $9::int8[], $10::bool[])
              AS u(trace_id, span_id, counted, outcome, own_outcome, error_type, tool, peer, overhead,
                   loop_counted)
         WHERE t.trace_id = u.trace_id AND t.span_id = u.span_id",
    )
    .bind(traces)
    .bind(spans)
    .bind(counted)
    .bind(outcomes)
    .bind(owns)
    .bind(errors)
    .bind(tools)
    .bind(peers)
    .bind(overheads)
    .bind(loops)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn update_methods(conn: &mut PgConnection, rows: &[&MethodRow]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let traces: Vec<Vec<u8>> = rows.iter().map(|r| r.trace_id.to_vec()).collect();
    let spans: Vec<Vec<u8>> = rows.iter().map(|r| r.span_id.to_vec()).collect();
    sqlx::query(
        "UPDATE mcp_requests t SET counted = false
         FROM unnest($1::bytea[], $2::bytea[]) AS u(trace_id, span_id)
         WHERE t.trace_id = u.trace_id AND t.span_id = u.span_id",
    )
    .bind(traces)
    .bind(spans)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        span: u8,
        parent: Option<u8>,
        client: bool,
        tool: &str,
        own: Outcome,
        dur: i64,
    ) -> ToolRow {
        ToolRow {
            trace_id: [1; 16],
            span_id: [span; 8],
            parent: parent.map(|p| [p; 8]),
            inner: None,
            client,
            own,
            request_id: None,
            service: if client { "agent" } else { "server" }.into(),
            start_unix_nanos: i64::from(span),
            duration_us: dur,
            result_bytes: None,
            result_items: None,
            result_empty: None,
            session_key: "s".into(),
            args_hash: Vec::new(),
            state: ToolState {
                counted: true,
                outcome: own,
                error_type: (own != Outcome::Ok).then(|| "x".into()),
                tool: tool.into(),
                peer: None,
                overhead_us: None,
                // As stored alone.
                loop_counted: own != Outcome::Ok,
            },
        }
    }

    #[test]
    fn a_server_error_reaches_the_client_and_overhead_is_the_difference() {
        let rows = [
            row(1, None, true, "echo", Outcome::Ok, 900),
            row(2, Some(1), false, "echo", Outcome::Error, 600),
        ];
        let s = resolve_tools(&rows);
        assert_eq!(s[0].outcome, Outcome::Error);
        assert_eq!(s[0].error_type.as_deref(), Some("x"));
        assert_eq!(s[0].peer, Some([2; 8]));
        assert_eq!(s[0].overhead_us, Some(300));
        assert_eq!(s[1].outcome, Outcome::Error);
        assert_eq!(s[1].peer, Some([1; 8]));
        assert_eq!(s[1].overhead_us, None);
        // Resolving the resolved rows changes nothing.
        let again: Vec<ToolRow> = rows
            .iter()
            .zip(&s)
            .map(|(r, s)| ToolRow {
                state: s.clone(),
                ..r.clone()
            })
            .collect();
        assert_eq!(resolve_tools(&again), s);
    }

    #[test]
    fn a_cancelled_client_makes_the_server_row_cancelled_without_overhead() {
        let rows = [
            row(1, None, true, "slow", Outcome::Cancelled, 500_000),
            row(2, Some(1), false, "slow", Outcome::Ok, 3_000_000),
        ];
        let s = resolve_tools(&rows);
        assert_eq!(s[1].outcome, Outcome::Cancelled);
        assert_eq!(
            s[1].error_type.as_deref(),
            Some("x"),
            "the client's error type"
        );
        assert_eq!(s[0].overhead_us, None);
    }

    #[test]
    fn a_nested_send_span_is_not_counted_and_links_the_server() {
        // FastMCP client span 1, the SDK's `MCP send` span 2 inside it, the server span 3 whose
        // parent is span 2; the server saw the tool fail, the client spans stayed UNSET.
        let rows = [
            row(1, Some(9), true, "echo", Outcome::Ok, 1000),
            row(2, Some(1), true, "echo", Outcome::Ok, 950),
            row(3, Some(2), false, "echo", Outcome::Error, 700),
        ];
        let s = resolve_tools(&rows);
        assert!(s[0].counted && !s[1].counted && s[2].counted);
        assert_eq!(s[0].peer, Some([3; 8]));
        assert_eq!(s[2].peer, Some([1; 8]));
        assert_eq!(s[0].outcome, Outcome::Error);
        assert_eq!(s[0].overhead_us, Some(300));
        // The nested span's row is only a link.
        assert_eq!((s[1].peer, s[1].outcome), (None, Outcome::Ok));
    }

    #[test]
    fn a_pair_moves_to_the_outer_span_when_it_arrives_last() {
        // The SDK span 2 and the server span 3 were stored and joined first; FastMCP's span 1
        // around span 2 arrives last.
        let mut nested = row(2, Some(1), true, "echo", Outcome::Ok, 950);
        nested.state.peer = Some([3; 8]);
        nested.state.outcome = Outcome::Error;
        nested.state.overhead_us = Some(250);
        let mut server = row(3, Some(2), false, "echo", Outcome::Error, 700);
        server.state.peer = Some([2; 8]);
        let rows = [
            row(1, Some(9), true, "echo", Outcome::Ok, 1000),
            nested,
            server,
        ];
        let s = resolve_tools(&rows);
        assert_eq!(s[0].peer, Some([3; 8]));
        assert_eq!(s[0].outcome, Outcome::Error);
        assert_eq!(s[0].overhead_us, Some(300));
        assert!(!s[1].counted);
        assert_eq!(
            (s[1].peer, s[1].overhead_us, s[1].outcome),
            (None, None, Outcome::Ok)
        );
        assert_eq!(s[2].peer, Some([1; 8]));
    }

    #[test]
    fn a_link_pairs_only_once_its_call_has_arrived() {
        // OpenLLMetry exported span by span: the client writer span 2 (a link, never counted)
        // and the server's writer span 3 (its child) are stored before the tool span 1.
        let mut link = row(2, Some(1), true, UNKNOWN_TOOL, Outcome::Ok, 900);
        link.state.counted = false;
        let server = row(3, Some(2), false, UNKNOWN_TOOL, Outcome::Error, 700);
        let early = resolve_tools(&[link.clone(), server.clone()]);
        assert!(
            early.iter().all(|s| s.peer.is_none()),
            "nothing to pair with yet"
        );
        assert!(!early[0].counted);
        let s = resolve_tools(&[
            row(1, None, true, "search", Outcome::Ok, 1000),
            link,
            server,
        ]);
        assert_eq!(s[0].peer, Some([3; 8]));
        assert_eq!(s[2].tool, "search");
        assert_eq!(s[0].outcome, Outcome::Error);
        assert!(!s[1].counted);
    }

    #[test]
    fn an_inner_span_kept_on_the_outer_row_links_the_server() {
        let mut client = row(1, None, true, "echo", Outcome::Ok, 1000);
        client.inner = Some([7; 8]);
        let rows = [client, row(3, Some(7), false, "echo", Outcome::Ok, 400)];
        let s = resolve_tools(&rows);
        assert_eq!(s[0].peer, Some([3; 8]));
        assert_eq!(s[0].overhead_us, Some(600));
    }

    #[test]
    fn an_unnamed_server_call_takes_the_clients_tool_by_request_id() {
        let mut client = row(1, None, true, "search", Outcome::Ok, 1000);
        client.request_id = Some("4".into());
        let mut other = row(5, None, true, "echo", Outcome::Ok, 1000);
        other.request_id = Some("5".into());
        let mut server = row(3, Some(42), false, UNKNOWN_TOOL, Outcome::Error, 400);
        server.request_id = Some("4".into());
        let s = resolve_tools(&[client, other, server]);
        assert_eq!(s[2].tool, "search");
        assert_eq!(s[2].peer, Some([1; 8]));
        assert_eq!(s[0].outcome, Outcome::Error);
        assert_eq!(s[1].peer, None);
    }

    #[test]
    fn an_ambiguous_request_id_joins_nothing() {
        let mut a = row(1, None, true, "echo", Outcome::Ok, 1000);
        a.request_id = Some("1".into());
        let mut b = row(2, None, true, "echo", Outcome::Ok, 1000);
        b.request_id = Some("1".into());
        let mut server = row(3, None, false, "echo", Outcome::Error, 400);
        server.request_id = Some("1".into());
        let s = resolve_tools(&[a, b, server]);
        assert!(s.iter().all(|s| s.peer.is_none()));
    }

    #[test]
    fn one_side_only_changes_nothing() {
        let rows = [row(1, None, true, "echo", Outcome::Ok, 10)];
        assert_eq!(resolve_tools(&rows)[0], rows[0].state);
        let rows = [row(2, Some(1), false, "echo", Outcome::Error, 10)];
        assert_eq!(resolve_tools(&rows)[0], rows[0].state);
    }

    #[test]
    fn a_retried_server_attempt_is_not_a_second_pair() {
        let rows = [
            row(1, None, true, "echo", Outcome::Ok, 1000),
            row(2, Some(1), false, "echo", Outcome::Ok, 300),
            row(3, Some(1), false, "echo", Outcome::Ok, 300),
        ];
        let s = resolve_tools(&rows);
        assert_eq!(s[1].peer, Some([1; 8]));
        assert_eq!(s[2].peer, None);
    }

    /// tool, side, outcome, own outcome when different, rate limited.
    type CallKey<'a> = (&'a str, &'a str, &'a str, &'a str, bool);

    /// What the join makes of a live capture (one OTLP/JSON export per line, in the order
    /// toolsight received them): per tool, side, outcome, own outcome (when it differs) and
    /// whether the call was refused by a rate limiter, the number of counted rows; `rows` is how
    /// many tool-call records the capture normalizes into. Every counted row must be joined.
    fn joined_capture(text: &str) -> (usize, Vec<(CallKey<'static>, usize)>) {
        let exports: Vec<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        > = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let now = exports[0].resource_spans[0].scope_spans[0].spans[0].start_time_unix_nano as i64;
        let mut rows: Vec<ToolRow> = exports
            .iter()
            .flat_map(|e| crate::normalize::normalize(e, now, &Default::default()).tool_calls)
            .map(|c| ToolRow::of(&c))
            .collect();
        rows.sort_by_key(|r| (r.trace_id, r.span_id));
        let mut table: std::collections::BTreeMap<(String, &str, &str, &str, bool), usize> =
            Default::default();
        for trace in rows.chunk_by(|a, b| a.trace_id == b.trace_id) {
            for (row, s) in trace.iter().zip(resolve_tools(trace)) {
                if !s.counted {
                    continue;
                }
                let own = if row.own != s.outcome {
                    row.own.as_str()
                } else {
                    ""
                };
                let side = if row.client { "client" } else { "server" };
                let limited = s.error_type.as_deref() == Some("rate_limited");
                *table
                    .entry((s.tool.clone(), side, s.outcome.as_str(), own, limited))
                    .or_default() += 1;
                assert!(s.peer.is_some(), "{} {side} joined", s.tool);
            }
        }
        // Tool names as the expected tables spell them, so the two compare as they print.
        let name = |t: &str| -> &'static str {
            [
                "echo",
                "fail_tool",
                "limited",
                "list_items",
                "rows",
                "slow",
                "soft_fail",
            ]
            .into_iter()
            .find(|n| *n == t)
            .unwrap_or_else(|| panic!("a tool the demos do not have: {t}"))
        };
        let table = table
            .into_iter()
            .map(|((t, s, o, own, l), n)| ((name(&t), s, o, own, l), n))
            .collect();
        (rows.len(), table)
    }

    /// The per-call table of the MCP SDK demo (`tests/mcp1/sdk1_demo.py`), the same for every
    /// instrumentation but for what its client span says itself of a tool error (`client_own`:
    /// the SDK 2.x's own spans say "ok") and whether a rate limiter's refusal is recognisable
    /// (`limited`: the SDK 2.x's spans carry no message).
    fn sdk_demo_table(client_own: &'static str, limited: bool) -> Vec<(CallKey<'static>, usize)> {
        let mut want = vec![
            (("echo", "client", "ok", "", false), 2),
            (("echo", "server", "ok", "", false), 2),
            (("fail_tool", "client", "error", client_own, false), 6),
            (("fail_tool", "server", "error", "", false), 6),
            (("limited", "client", "error", client_own, limited), 1),
            (("limited", "client", "ok", "", false), 2),
            (("limited", "server", "error", "", limited), 1),
            (("limited", "server", "ok", "", false), 2),
            (("list_items", "client", "ok", "", false), 1),
            (("list_items", "server", "ok", "", false), 1),
            (("rows", "client", "ok", "", false), 1),
            (("rows", "server", "ok", "", false), 1),
            (("slow", "client", "cancelled", "", false), 1),
            // The server finished "ok" after the client had given up.
            (("slow", "server", "cancelled", "ok", false), 1),
            (("soft_fail", "client", "error", client_own, false), 1),
            (("soft_fail", "server", "error", "", false), 1),
        ];
        want.sort();
        want
    }

    /// A live capture: a FastMCP 4.1.6 server and client in two processes over streamable
    /// HTTP, each exporting span by span (40 exports, in the order they arrived). What the join
    /// makes of the stored records is the table the live test asserts.
    #[test]
    fn the_two_process_capture_joins_into_one_row_per_call_and_side() {
        let text = include_str!("../../tests/fixtures/fastmcp/two-process-http-simple.jsonl");
        assert_eq!(text.lines().count(), 40);
        let (rows, got) = joined_capture(text);
        // 9 calls: FastMCP's client span, the SDK's `MCP send` (its own export) and the server's.
        assert_eq!(rows, 27);
        let want: Vec<(CallKey, usize)> = vec![
            (("fail_tool", "client", "error", "", false), 1),
            (("fail_tool", "server", "error", "", false), 1),
            (("limited", "client", "error", "", true), 2),
            (("limited", "client", "ok", "", false), 2),
            (("limited", "server", "error", "", true), 2),
            (("limited", "server", "ok", "", false), 2),
            (("list_items", "client", "ok", "", false), 1),
            (("list_items", "server", "ok", "", false), 1),
            (("rows", "client", "ok", "", false), 1),
            (("rows", "server", "ok", "", false), 1),
            (("slow", "client", "cancelled", "", false), 1),
            (("slow", "server", "cancelled", "ok", false), 1),
            (("soft_fail", "client", "error", "", false), 1),
            (("soft_fail", "server", "error", "ok", false), 1),
        ];
        assert_eq!(got, want);
    }

    /// Live captures of the MCP SDK demo over streamable HTTP, each process exporting span by
    /// span: Logfire 5.4 and OpenLLMetry 0.62.4 on mcp 1.30, and on mcp 2.3 the SDK's own
    /// tracing alone and under Logfire 5.4. Each joins into the table the live test asserts.
    #[test]
    fn the_sdk_captures_over_streamable_http_join_into_one_row_per_call_and_side() {
        let cases = [
            (
                "logfire on mcp 1.x",
                include_str!("../../tests/fixtures/logfire/sdk1-http.jsonl"),
                "",
                true,
            ),
            (
                "openllmetry on mcp 1.x",
                include_str!("../../tests/fixtures/traceloop/sdk1-http.jsonl"),
                "",
                true,
            ),
            (
                "the sdk on mcp 2.x",
                include_str!("../../tests/fixtures/mcp-sdk/sdk2-http.jsonl"),
                "ok",
                false,
            ),
            (
                "logfire on mcp 2.x",
                include_str!("../../tests/fixtures/logfire/sdk2-http.jsonl"),
                "ok",
                false,
            ),
        ];
        for (case, text, client_own, limited) in cases {
            let (_, got) = joined_capture(text);
            assert_eq!(got, sdk_demo_table(client_own, limited), "{case}");
        }
    }

    #[test]
    fn nested_methods() {
        let m = |span: u8, parent: Option<u8>, method: &str| MethodRow {
            trace_id: [1; 16],
            span_id: [span; 8],
            parent: parent.map(|p| [p; 8]),
            method: method.into(),
            service: "agent".into(),
            start_unix_nanos: 0,
            duration_us: 5,
            error: false,
            orphan: false,
            counted: true,
        };
        let rows = [
            m(1, None, "tools/list"),
            m(2, Some(1), "tools/list"),
            m(3, Some(1), "initialize"),
        ];
        assert_eq!(resolve_methods(&rows), [true, false, true]);
    }
}

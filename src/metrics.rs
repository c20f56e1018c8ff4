//! Self-observability: the counters and gauges served on the admin port's `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub group: String,
    pub alert: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExportLabel {
    pub transport: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryableLabel {
    pub retryable: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabel {
    pub receiver: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabel {
    pub file: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabel {
    pub task: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabel {
    pub listener: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReceiverLabel {
    pub receiver: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabel {
    pub target: String,
    pub result: &'static str,
}

/// Every metric toolsight exports. Cheap to share: all fields are atomics behind `Arc`s.
pub struct Metrics {
    pub registry: Registry,
    pub spans_received: Family<TransportLabel, Counter>,
    pub spans_accepted: Counter,
    pub spans_rejected: Family<ReasonLabel, Counter>,
    pub spans_dropped: Family<ReasonLabel, Counter>,
    pub exports: Family<ExportLabel, Counter>,
    pub records_written: Family<KindLabel, Counter>,
    pub queue_depth_rows: Gauge,
    pub queue_capacity_rows: Gauge,
    pub batch_rows: Histogram,
    pub write_seconds: Histogram,
    pub db_errors: Family<RetryableLabel, Counter>,
    pub db_up: Gauge,
    pub correlated: Family<KindLabel, Counter>,
    pub correlation_failures: Counter,
    pub exports_in_progress: Gauge,
    pub notify_attempts: Family<DeliveryLabel, Counter>,
    pub notifications: Family<DeliveryLabel, Counter>,
    pub notify_circuit_open: Family<ReceiverLabel, Gauge>,
    pub notify_outbox_pending: Gauge,
    pub forward_exports: Family<ForwardLabel, Counter>,
    pub forward_retries: Family<TargetLabel, Counter>,
    pub forward_queue_bytes: Family<TargetLabel, Gauge>,
    pub cardinality_folded: Family<KindLabel, Counter>,
    pub cardinality_tracked: Gauge,
    pub leader: Family<RoleLabel, Gauge>,
    pub reloads: Family<ReloadLabel, Counter>,
    pub keys_truncated: Counter,
    pub scrubbed_fields: Counter,
    pub evaluations_missed: Family<GroupLabel, Counter>,
    pub evaluation_lag: Family<GroupLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub group_duration: Family<GroupLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub group_last_evaluation: Family<GroupLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub rule_window_rows: Family<GroupLabel, Gauge>,
    pub rule_failures: Family<RuleLabel, Counter>,
    pub task_failures: Family<TaskLabel, Counter>,
    pub connections_open: Family<ListenerLabel, Gauge>,
    pub connections_closed: Family<ConnLabel, Counter>,
}

impl Metrics {
    /// Counts one reload of `file` (`rules`, `tokens`).
    pub fn reloaded(&self, file: &'static str, applied: bool) {
        let result = if applied { "applied" } else { "invalid" };
        self.reloads
            .get_or_create(&ReloadLabel { file, result })
            .inc();
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("toolsight");
        let m = Metrics {
            spans_received: Family::default(),
            spans_accepted: Counter::default(),
            spans_rejected: Family::default(),
            spans_dropped: Family::default(),
            exports: Family::default(),
            records_written: Family::default(),
            queue_depth_rows: Gauge::default(),
            queue_capacity_rows: Gauge::default(),
            batch_rows: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            write_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            db_errors: Family::default(),
            db_up: Gauge::default(),
            correlated: Family::default(),
            correlation_failures: Counter::default(),
            exports_in_progress: Gauge::default(),
            notify_attempts: Family::default(),
            notifications: Family::default(),
            notify_circuit_open: Family::default(),
            forward_exports: Family::default(),
            forward_retries: Family::default(),
            forward_queue_bytes: Family::default(),
            notify_outbox_pending: Gauge::default(),
            cardinality_folded: Family::default(),
            cardinality_tracked: Gauge::default(),
            leader: Family::default(),
            reloads: Family::default(),
            keys_truncated: Counter::default(),
            scrubbed_fields: Counter::default(),
            evaluations_missed: Family::default(),
            evaluation_lag: Family::default(),
            group_duration: Family::default(),
            group_last_evaluation: Family::default(),
            rule_window_rows: Family::default(),
            rule_failures: Family::default(),
            task_failures: Family::default(),
            connections_open: Family::default(),
            connections_closed: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "spans_received",
            "spans received, by transport",
            m.spans_received.clone(),
        );
        registry.register(
            "spans_accepted",
            "spans accepted and committed (records or counted drops)",
            m.spans_accepted.clone(),
        );
        registry.register(
            "spans_rejected",
            "spans rejected as malformed, by reason",
            m.spans_rejected.clone(),
        );
        registry.register(
            "spans_dropped",
            "well-formed spans not stored, by reason",
            m.spans_dropped.clone(),
        );
        registry.register(
            "exports",
            "export requests, by transport and result",
            m.exports.clone(),
        );
        registry.register(
            "records_written",
            "records committed to PostgreSQL, by kind",
            m.records_written.clone(),
        );
        registry.register(
            "queue_depth_rows",
            "records waiting for the writers",
            m.queue_depth_rows.clone(),
        );
        registry.register(
            "queue_capacity_rows",
            "records the write queue holds at most",
            m.queue_capacity_rows.clone(),
        );
        registry.register(
            "batch_rows",
            "records per database write",
            m.batch_rows.clone(),
        );
        registry.register(
            "write_seconds",
            "time to write and commit one batch",
            m.write_seconds.clone(),
        );
        registry.register(
            "db_errors",
            "database errors, by retryability",
            m.db_errors.clone(),
        );
        registry.register(
            "db_up",
            "1 when the last database check succeeded",
            m.db_up.clone(),
        );
        registry.register(
            "calls_correlated",
            "stored spans joined after the fact: kind=pair (a call's client and server sides), kind=nested (a client span nested in another of the same call, left out of the rollups)",
            m.correlated.clone(),
        );
        registry.register(
            "correlation_failures",
            "batches whose join with the stored other sides failed (their rows are stored, not joined)",
            m.correlation_failures.clone(),
        );
        registry.register(
            "exports_in_progress",
            "exports admitted and not yet answered",
            m.exports_in_progress.clone(),
        );
        registry.register(
            "notify_attempts",
            "notification delivery attempts, by receiver and result (ok, retry, rejected)",
            m.notify_attempts.clone(),
        );
        registry.register(
            "notifications",
            "notifications finished, by receiver and result (delivered, failed, given_up)",
            m.notifications.clone(),
        );
        registry.register(
            "notify_circuit_open",
            "1 while a receiver's circuit breaker is open",
            m.notify_circuit_open.clone(),
        );
        registry.register(
            "forward_exports",
            "accepted exports handed to a forwarding target, by target and result (sent, filtered, queue_full, failed, rejected, stopped)",
            m.forward_exports.clone(),
        );
        registry.register(
            "forward_retries",
            "retried sends to a forwarding target",
            m.forward_retries.clone(),
        );
        registry.register(
            "forward_queue_bytes",
            "bytes of exports waiting for a forwarding target",
            m.forward_queue_bytes.clone(),
        );
        registry.register(
            "notify_outbox_pending",
            "notifications written to the outbox and not yet delivered",
            m.notify_outbox_pending.clone(),
        );
        registry.register(
            "cardinality_folded",
            "records whose key was folded into __overflow__ by the cardinality guard, by kind (service, key, session)",
            m.cardinality_folded.clone(),
        );
        registry.register(
            "cardinality_tracked_keys",
            "keys the cardinality guard remembers",
            m.cardinality_tracked.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the role's lock (evaluator, notifier), 0 while it stands by; absent before its first try",
            m.leader.clone(),
        );
        registry.register(
            "reloads",
            "changed rule and token files seen, by file (rules, tokens) and result (applied, invalid: the previous ones stay)",
            m.reloads.clone(),
        );
        registry.register(
            "keys_truncated",
            "keys (service, tool, session, model, upstream, ...) longer than their bound, stored cut with a hash suffix",
            m.keys_truncated.clone(),
        );
        registry.register(
            "rule_group_iterations_missed",
            "aligned evaluation instants of a rule group that were skipped because its previous evaluation was still running or the evaluator was late",
            m.evaluations_missed.clone(),
        );
        registry.register(
            "rule_group_duration_seconds",
            "how long the last evaluation of a rule group took, its queries and the saving of its state",
            m.group_duration.clone(),
        );
        registry.register(
            "rule_group_last_evaluation_timestamp_seconds",
            "the aligned instant (Unix seconds) of the last evaluation of a rule group that finished",
            m.group_last_evaluation.clone(),
        );
        registry.register(
            "rule_group_window_rows",
            "per-minute state rows a rule group keeps in memory between evaluations (bounded by its keys times the minutes of its windows)",
            m.rule_window_rows.clone(),
        );
        registry.register(
            "rule_evaluation_failures",
            "rule evaluations that failed (a query error or timeout), by group and alert",
            m.rule_failures.clone(),
        );
        registry.register(
            "rule_evaluation_lag_seconds",
            "how long after its aligned instant the last evaluation of a rule group started",
            m.evaluation_lag.clone(),
        );
        registry.register(
            "spans_scrubbed_fields",
            "values an instrumentation scrubbed ([Scrubbed due to ...]) skipped where they would have become a tool name, a session key or an arguments hash",
            m.scrubbed_fields.clone(),
        );
        registry.register(
            "background_task_failures",
            "background tasks (pruner, evaluator, notifier, ...) that died; /readyz answers 503 after one",
            m.task_failures.clone(),
        );
        registry.register(
            "connections_open",
            "connections open, by listener (grpc, http, admin)",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_closed",
            "connections closed by toolsight, by listener and reason (limit, idle, handshake_timeout, handshake_failed)",
            m.connections_closed.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Every sample of the exposition as (metric, labels, value), histogram buckets left out
    /// (their `_sum` and `_count` stay).
    pub fn samples(&self) -> Vec<(String, String, f64)> {
        self.encode()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let value: f64 = value.parse().ok()?;
                let (name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                (!name.ends_with("_bucket") && !name.ends_with("_created"))
                    .then(|| (name.to_owned(), labels.to_owned(), value))
            })
            .collect()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_the_exposition() {
        let m = Metrics::new();
        m.spans_accepted.inc_by(7);
        m.spans_rejected
            .get_or_create(&ReasonLabel {
                reason: "malformed",
            })
            .inc();
        m.write_seconds.observe(0.01);
        let s = m.samples();
        let find = |name: &str| s.iter().find(|(n, _, _)| n == name).cloned();
        assert_eq!(
            find("toolsight_spans_accepted_total"),
            Some(("toolsight_spans_accepted_total".into(), String::new(), 7.0))
        );
        assert_eq!(
            find("toolsight_spans_rejected_total").unwrap().1,
            "reason=\"malformed\""
        );
        assert_eq!(find("toolsight_write_seconds_count").unwrap().2, 1.0);
        assert!(find("toolsight_write_seconds_bucket").is_none());
    }
}

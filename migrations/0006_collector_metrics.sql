-- The collector's own metrics, sampled every 15 s per instance, so dashboards that read only
-- PostgreSQL can show ingest rate, rejections, queue depth and write latency. Counters are
-- cumulative per instance (a restart starts them again from zero); readers take deltas.
CREATE TABLE collector_metrics (
    at        timestamptz NOT NULL,
    instance  text        NOT NULL,
    metric    text        NOT NULL,
    labels    text        NOT NULL DEFAULT '',   -- e.g. reason="malformed"
    value     float8      NOT NULL
);
CREATE INDEX collector_metrics_metric_at ON collector_metrics (metric, at);

-- toolsight ingest schema: raw records, per-minute rollups, and the latency histogram functions
-- shared by the API, the dashboards and the alert rules.

-- Latency histogram ---------------------------------------------------------------------------
-- A histogram is a bigint[] of counts; position i+1 holds bucket i. Bucket 0 holds durations up to
-- 10 µs; bucket i (1..111) holds durations in (10·2^((i-1)/4), 10·2^(i/4)] µs, so each bucket is
-- 19% wide (quantile error under ±9.5%) and bucket 111 ends at about 38 minutes (longer durations
-- land there too). Arrays are trimmed after their last non-zero bucket.

CREATE FUNCTION toolsight_latency_bucket(duration_us bigint) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT CASE WHEN duration_us <= 10 THEN 0
                ELSE least(111, ceil(4 * ln(duration_us / 10.0::float8) / ln(2::float8) - 1e-9)::int) END
$$;

-- Upper bound of bucket i, in microseconds.
CREATE FUNCTION toolsight_bucket_upper_us(i int) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT 10 * power(2::float8, i / 4.0)
$$;

-- Element-wise sum of two histograms of any lengths.
CREATE FUNCTION toolsight_hist_add(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN a IS NULL THEN b
        WHEN b IS NULL THEN a
        ELSE ARRAY(
            SELECT coalesce(a[i], 0) + coalesce(b[i], 0)
            FROM generate_series(1, greatest(cardinality(a), cardinality(b))) AS i
            ORDER BY i)
    END
$$;

-- Merges histograms across rows: toolsight_hist_merge(latency_hist).
CREATE AGGREGATE toolsight_hist_merge(bigint[]) (
    SFUNC = toolsight_hist_add,
    STYPE = bigint[],
    COMBINEFUNC = toolsight_hist_add,
    PARALLEL = SAFE
);

-- Builds a histogram from parallel arrays of bucket indexes and counts.
CREATE FUNCTION toolsight_hist_build(buckets int[], counts bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT ARRAY(
        SELECT coalesce(sum(c), 0)::bigint
        FROM generate_series(0, (SELECT max(b) FROM unnest(buckets) AS b)) AS i
        LEFT JOIN unnest(buckets, counts) AS x(b, c) ON x.b = i
        GROUP BY i ORDER BY i)
$$;

-- The q-quantile (0..1) of a histogram, in milliseconds, interpolated linearly inside the bucket.
-- NULL for an empty histogram. This is THE quantile of toolsight: the API, the dashboards and the
-- alert rules all call it, so an alert's value equals the panel's.
CREATE FUNCTION toolsight_hist_quantile(hist bigint[], q float8) RETURNS float8
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    total bigint := 0;
    rank float8;
    cum bigint := 0;
    c bigint;
    lower_us float8;
    upper_us float8;
BEGIN
    IF hist IS NULL OR q IS NULL THEN RETURN NULL; END IF;
    SELECT coalesce(sum(x), 0) INTO total FROM unnest(hist) AS x;
    IF total = 0 THEN RETURN NULL; END IF;
    rank := greatest(0.0, least(1.0, q)) * total;
    FOR i IN 1 .. cardinality(hist) LOOP
        c := coalesce(hist[i], 0);
        IF c > 0 AND cum + c >= rank THEN
            lower_us := CASE WHEN i = 1 THEN 0 ELSE toolsight_bucket_upper_us(i - 2) END;
            upper_us := toolsight_bucket_upper_us(i - 1);
            RETURN (lower_us + (upper_us - lower_us) * greatest(0.0, (rank - cum)) / c) / 1000.0;
        END IF;
        cum := cum + c;
    END LOOP;
    RETURN toolsight_bucket_upper_us(cardinality(hist) - 1) / 1000.0;
END
$$;

-- Raw records ---------------------------------------------------------------------------------
-- Primary keys on (trace_id, span_id) make retried exports idempotent. BRIN indexes on time keep
-- inserts cheap and let time-range scans and retention deletes skip old blocks.

CREATE TABLE tool_calls (
    trace_id         bytea       NOT NULL,
    span_id          bytea       NOT NULL,
    parent_span_id   bytea,
    start_time       timestamptz NOT NULL,
    duration_us      bigint      NOT NULL,
    service          text        NOT NULL,
    service_instance text,
    tool             text        NOT NULL,
    side             text        NOT NULL CHECK (side IN ('client', 'server')),
    source           text        NOT NULL,
    outcome          text        NOT NULL CHECK (outcome IN ('ok', 'error', 'cancelled')),
    error_type       text,
    session_key      text        NOT NULL,
    session_source   text        NOT NULL,
    request_id       text,
    result_bytes     bigint,
    result_items     integer,
    result_empty     boolean,
    args_hash        bytea,
    args_redacted    text,
    result_redacted  text,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX tool_calls_start_brin ON tool_calls USING brin (start_time);

CREATE TABLE mcp_requests (
    trace_id         bytea       NOT NULL,
    span_id          bytea       NOT NULL,
    parent_span_id   bytea,
    start_time       timestamptz NOT NULL,
    duration_us      bigint      NOT NULL,
    service          text        NOT NULL,
    service_instance text,
    method           text        NOT NULL,
    side             text        NOT NULL CHECK (side IN ('client', 'server')),
    source           text        NOT NULL,
    outcome          text        NOT NULL CHECK (outcome IN ('ok', 'error', 'cancelled')),
    orphan           boolean     NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX mcp_requests_start_brin ON mcp_requests USING brin (start_time);

CREATE TABLE llm_calls (
    trace_id         bytea       NOT NULL,
    span_id          bytea       NOT NULL,
    parent_span_id   bytea,
    start_time       timestamptz NOT NULL,
    duration_us      bigint      NOT NULL,
    service          text        NOT NULL,
    service_instance text,
    model            text        NOT NULL,
    provider         text,
    operation        text        NOT NULL,
    input_tokens     bigint      NOT NULL,
    output_tokens    bigint      NOT NULL,
    error            boolean     NOT NULL,
    session_key      text        NOT NULL,
    session_source   text        NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX llm_calls_start_brin ON llm_calls USING brin (start_time);

CREATE TABLE upstream_calls (
    trace_id         bytea       NOT NULL,
    span_id          bytea       NOT NULL,
    parent_span_id   bytea,
    start_time       timestamptz NOT NULL,
    duration_us      bigint      NOT NULL,
    service          text        NOT NULL,
    service_instance text,
    server_address   text        NOT NULL,
    method           text,
    status_code      integer,
    ratelimit_remaining float8,
    ratelimit_limit  float8,
    ratelimit_reset_at timestamptz,
    retry_after_s    float8,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX upstream_calls_start_brin ON upstream_calls USING brin (start_time);

-- Per-minute rollups ---------------------------------------------------------------------------
-- Updated in the same transaction as the raw insert, from the rows that insert actually added, so
-- a retried export never counts twice.

CREATE TABLE tool_rollup_1m (
    minute        timestamptz NOT NULL,
    service       text        NOT NULL,
    tool          text        NOT NULL,
    side          text        NOT NULL,
    calls         bigint      NOT NULL,
    errors        bigint      NOT NULL,
    cancellations bigint      NOT NULL,
    with_result   bigint      NOT NULL,  -- calls whose result content was captured
    empty_results bigint      NOT NULL,
    result_bytes  bigint      NOT NULL,
    result_items  bigint      NOT NULL,
    duration_us_sum bigint    NOT NULL,
    latency_hist  bigint[]    NOT NULL,
    PRIMARY KEY (service, tool, side, minute)
);
CREATE INDEX tool_rollup_1m_minute ON tool_rollup_1m (minute);

CREATE TABLE mcp_method_rollup_1m (
    minute        timestamptz NOT NULL,
    service       text        NOT NULL,
    method        text        NOT NULL,
    side          text        NOT NULL,
    calls         bigint      NOT NULL,
    errors        bigint      NOT NULL,
    orphans       bigint      NOT NULL,
    latency_hist  bigint[]    NOT NULL,
    PRIMARY KEY (service, method, side, minute)
);
CREATE INDEX mcp_method_rollup_1m_minute ON mcp_method_rollup_1m (minute);

CREATE TABLE llm_rollup_1m (
    minute        timestamptz NOT NULL,
    service       text        NOT NULL,
    model         text        NOT NULL,
    calls         bigint      NOT NULL,
    errors        bigint      NOT NULL,
    input_tokens  bigint      NOT NULL,
    output_tokens bigint      NOT NULL,
    latency_hist  bigint[]    NOT NULL,
    PRIMARY KEY (service, model, minute)
);
CREATE INDEX llm_rollup_1m_minute ON llm_rollup_1m (minute);

CREATE TABLE upstream_rollup_1m (
    minute        timestamptz NOT NULL,
    service       text        NOT NULL,
    server_address text       NOT NULL,
    calls         bigint      NOT NULL,
    rate_limited  bigint      NOT NULL,  -- HTTP 429
    server_errors bigint      NOT NULL,  -- HTTP 5xx
    min_remaining_ratio float8,          -- lowest remaining / limit seen in the minute
    latency_hist  bigint[]    NOT NULL,
    PRIMARY KEY (service, server_address, minute)
);
CREATE INDEX upstream_rollup_1m_minute ON upstream_rollup_1m (minute);

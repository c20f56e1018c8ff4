-- Time-partitioned storage, and the per-minute state the retry-loop and token-burn rules read.
--
-- Raw tables and the per-minute session state are partitioned by time (`retention.partition`,
-- one day by default); rollups by day. The service creates partitions ahead of time and on demand
-- (a span for a time no partition covers yet), and retention drops whole partitions: no DELETE,
-- no vacuum debt. Every partition is listed in `toolsight_partitions` with its bounds.
--
-- Existing tables are not copied: each becomes the first partition of its new parent (covering
-- everything up to the day after its newest row) and is dropped whole once that day expires.

CREATE TABLE toolsight_partitions (
    name        text        PRIMARY KEY,
    parent      text        NOT NULL,
    lower_bound timestamptz NOT NULL,   -- 1900-01-01 for a table attached as it was (MINVALUE)
    upper_bound timestamptz NOT NULL
);
CREATE INDEX toolsight_partitions_parent ON toolsight_partitions (parent, upper_bound);

-- Whether a tool call is counted in `loop_calls_1m` (what the retry-loop rule counts: see
-- `LOOP_CALLS` in src/store/alerts.rs). Kept on the row so the join can take back exactly what
-- the row added when what it says changes.
ALTER TABLE tool_calls ADD COLUMN loop_counted boolean NOT NULL DEFAULT false;
UPDATE tool_calls t SET loop_counted = true
WHERE t.counted AND (t.side = 'client' OR (t.peer_span_id IS NULL
        AND NOT EXISTS (SELECT 1 FROM tool_calls c
                        WHERE c.trace_id = t.trace_id AND c.side = 'client' AND c.tool = t.tool)))
    AND (t.args_hash IS NOT NULL OR t.outcome <> 'ok' OR t.result_empty IS TRUE);

-- Calls per minute and "same call" key (session, tool, arguments hash; '' where arguments are
-- not captured), per writer shard: the retry-loop rule sums a window of these, never raw rows.
CREATE TABLE loop_calls_1m (
    minute      timestamptz NOT NULL,
    service     text        NOT NULL,
    tool        text        NOT NULL,
    session_key text        NOT NULL,
    args_hash   bytea       NOT NULL,
    shard       smallint    NOT NULL,
    calls       bigint      NOT NULL,
    failed      bigint      NOT NULL,   -- outcome error or cancelled
    stuck       bigint      NOT NULL,   -- failed, or an empty result
    PRIMARY KEY (minute, service, tool, session_key, args_hash, shard)
) PARTITION BY RANGE (minute);

-- LLM tokens per minute and session, per writer shard: the token-burn rule's state.
CREATE TABLE session_tokens_1m (
    minute      timestamptz NOT NULL,
    service     text        NOT NULL,
    session_key text        NOT NULL,
    shard       smallint    NOT NULL,
    tokens      bigint      NOT NULL,
    PRIMARY KEY (minute, service, session_key, shard)
) PARTITION BY RANGE (minute);

-- Turns `tbl` into a table partitioned by `col` with primary key `pk`; its rows become the
-- partition `<tbl>_legacy`, covering everything before the day after the newest row.
-- Returns that bound (NULL when the table was empty).
CREATE FUNCTION pg_temp.toolsight_partition(tbl text, col text, pk text) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    legacy text := tbl || '_legacy';
    hi timestamptz;
    idx record;
    con text;
    def text;
BEGIN
    EXECUTE format('ALTER TABLE %I RENAME TO %I', tbl, legacy);
    -- Index names are per schema: free them for the new parent.
    FOR idx IN SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE i.indrelid = legacy::regclass LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', idx.relname,
                       legacy || substr(idx.relname, length(tbl) + 1));
    END LOOP;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY RANGE (%I)',
                   tbl, legacy, col);
    EXECUTE format('ALTER TABLE %I ADD PRIMARY KEY (%s)', tbl, pk);
    EXECUTE format('SELECT max(%I) FROM %I', col, legacy) INTO hi;
    IF hi IS NULL THEN
        EXECUTE format('DROP TABLE %I', legacy);
        RETURN NULL;
    END IF;
    hi := date_trunc('day', hi, 'UTC') + interval '1 day';
    -- The partition's primary key must be the parent's (the raw tables' gains the start time).
    SELECT conname, pg_get_constraintdef(oid) INTO con, def
    FROM pg_constraint WHERE conrelid = legacy::regclass AND contype = 'p';
    IF def IS DISTINCT FROM format('PRIMARY KEY (%s)', pk) THEN
        IF con IS NOT NULL THEN
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', legacy, con);
        END IF;
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I PRIMARY KEY (%s)', legacy, legacy || '_pkey', pk);
    END IF;
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)', tbl, legacy, hi);
    INSERT INTO toolsight_partitions VALUES (legacy, tbl, '1900-01-01 00:00:00+00', hi);
    RETURN hi;
END
$$;

-- An empty partition of `tbl` for [-infinity, hi): the state rebuilt from legacy rows goes there.
CREATE FUNCTION pg_temp.toolsight_legacy_partition(tbl text, hi timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (MINVALUE) TO (%L)',
                   tbl || '_legacy', tbl, hi);
    INSERT INTO toolsight_partitions VALUES (tbl || '_legacy', tbl, '1900-01-01 00:00:00+00', hi);
END
$$;

DO $$
DECLARE
    tool_hi timestamptz;
    llm_hi timestamptz;
BEGIN
    tool_hi := pg_temp.toolsight_partition('tool_calls', 'start_time', 'trace_id, span_id, start_time');
    CREATE INDEX tool_calls_start_brin ON tool_calls USING brin (start_time);
    PERFORM pg_temp.toolsight_partition('mcp_requests', 'start_time', 'trace_id, span_id, start_time');
    CREATE INDEX mcp_requests_start_brin ON mcp_requests USING brin (start_time);
    llm_hi := pg_temp.toolsight_partition('llm_calls', 'start_time', 'trace_id, span_id, start_time');
    CREATE INDEX llm_calls_start_brin ON llm_calls USING brin (start_time);
    PERFORM pg_temp.toolsight_partition('upstream_calls', 'start_time', 'trace_id, span_id, start_time');
    CREATE INDEX upstream_calls_start_brin ON upstream_calls USING brin (start_time);

    PERFORM pg_temp.toolsight_partition('tool_rollup_1m', 'minute', 'service, tool, side, minute, shard');
    CREATE INDEX tool_rollup_1m_minute ON tool_rollup_1m (minute);
    PERFORM pg_temp.toolsight_partition('mcp_method_rollup_1m', 'minute', 'service, method, side, minute, shard');
    CREATE INDEX mcp_method_rollup_1m_minute ON mcp_method_rollup_1m (minute);
    PERFORM pg_temp.toolsight_partition('llm_rollup_1m', 'minute', 'service, model, minute, shard');
    CREATE INDEX llm_rollup_1m_minute ON llm_rollup_1m (minute);
    PERFORM pg_temp.toolsight_partition('upstream_rollup_1m', 'minute', 'service, server_address, minute, shard');
    CREATE INDEX upstream_rollup_1m_minute ON upstream_rollup_1m (minute);

    -- The rules' state for the rows already stored.
    IF tool_hi IS NOT NULL THEN
        PERFORM pg_temp.toolsight_legacy_partition('loop_calls_1m', tool_hi);
        INSERT INTO loop_calls_1m
        SELECT date_trunc('minute', start_time), service, tool, session_key,
               coalesce(args_hash, '\x'::bytea), 0, count(*),
               count(*) FILTER (WHERE outcome <> 'ok'),
               count(*) FILTER (WHERE outcome <> 'ok' OR result_empty IS TRUE)
        FROM tool_calls WHERE loop_counted GROUP BY 1, 2, 3, 4, 5;
    END IF;
    IF llm_hi IS NOT NULL THEN
        PERFORM pg_temp.toolsight_legacy_partition('session_tokens_1m', llm_hi);
        INSERT INTO session_tokens_1m
        SELECT date_trunc('minute', start_time), service, session_key, 0,
               sum(input_tokens + output_tokens)::bigint
        FROM llm_calls GROUP BY 1, 2, 3;
    END IF;
END
$$;

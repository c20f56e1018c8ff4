-- The raw-row policy (`ingest.raw_keep_ok`): tool, LLM and upstream calls are partitioned first
-- by whether the policy keeps their raw rows. `<table>_kept` (every row stored so far) holds the
-- time partitions kept for `retention.raw`; `<table>_sampled_out` holds hourly partitions kept for
-- `retention.sampled_out`, long enough for the two sides of a call to be joined. Queries and the
-- join read the parent, which holds both; rollups and the rules' state count every call either
-- way.
--
-- No row is copied: each table becomes `<table>_kept`, under a new parent of the old name. The
-- primary key gains `kept` (a partitioned table's keys hold its partition keys), which builds the
-- key's index once per existing partition.

CREATE FUNCTION pg_temp.toolsight_split_kept(tbl text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    kept text := tbl || '_kept';
    idx record;
BEGIN
    EXECUTE format('ALTER TABLE %I RENAME TO %I', tbl, kept);
    -- Index names are per schema: free them for the new parent.
    FOR idx IN SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE i.indrelid = kept::regclass LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', idx.relname,
                       kept || substr(idx.relname, length(tbl) + 1));
    END LOOP;
    EXECUTE format('ALTER TABLE %I ADD COLUMN kept boolean NOT NULL DEFAULT true', kept);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', kept, kept || '_pkey');
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY LIST (kept)',
                   tbl, kept);
    EXECUTE format('ALTER TABLE %I ADD PRIMARY KEY (trace_id, span_id, start_time, kept)', tbl);
    -- The same index as the partitions' own: attaching adopts theirs instead of building one.
    EXECUTE format('CREATE INDEX %I ON %I USING brin (start_time)', tbl || '_start_brin', tbl);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES IN (true)', tbl, kept);
    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES IN (false) PARTITION BY RANGE (start_time)',
                   tbl || '_sampled_out', tbl);
    UPDATE toolsight_partitions SET parent = kept WHERE parent = tbl;
END
$$;

SELECT pg_temp.toolsight_split_kept('tool_calls');
SELECT pg_temp.toolsight_split_kept('llm_calls');
SELECT pg_temp.toolsight_split_kept('upstream_calls');

-- The minutes of the rules' per-minute tables that each transaction changed, so the evaluator
-- re-reads only those minutes, not its whole windows (`store::window`). Statement triggers
-- record them for every writer (the service's writers and joins of any version, `toolsight`
-- tools, hand-written SQL), in the writing transaction: a marker's row version carries the
-- same `xmin` as the rows it points at. Each writer shard has its own marker rows, so
-- concurrent writers never wait on each other here. Pruned with the rollups.
CREATE TABLE toolsight_changed_minutes (
    tbl    text        NOT NULL,
    minute timestamptz NOT NULL,
    shard  smallint    NOT NULL,
    PRIMARY KEY (tbl, minute, shard)
);

CREATE FUNCTION toolsight_mark_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Updating the marker writes a new row version, stamped with this transaction.
    INSERT INTO toolsight_changed_minutes AS c (tbl, minute, shard)
    SELECT DISTINCT TG_TABLE_NAME, minute, shard FROM changed
    ON CONFLICT (tbl, minute, shard) DO UPDATE SET tbl = c.tbl;
    RETURN NULL;
END $$;

DO $$
DECLARE
    tbl text;
    ev text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['tool_rollup_1m', 'loop_calls_1m', 'session_tokens_1m'] LOOP
        FOREACH ev IN ARRAY ARRAY['insert', 'update'] LOOP
            EXECUTE format(
                'CREATE TRIGGER toolsight_changed_%s AFTER %s ON %I
                 REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
                 EXECUTE FUNCTION toolsight_mark_changed()', ev, upper(ev), tbl);
        END LOOP;
    END LOOP;
END $$;

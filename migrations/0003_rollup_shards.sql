-- Each writer merges its deltas into its own shard of the rollups, so concurrent writers never
-- wait on each other's row locks. Readers sum over shards like they sum over minutes.
-- A lower fillfactor leaves room on each page for HOT updates of the rollup rows.

ALTER TABLE tool_rollup_1m ADD COLUMN shard smallint NOT NULL DEFAULT 0;
ALTER TABLE tool_rollup_1m DROP CONSTRAINT tool_rollup_1m_pkey,
    ADD PRIMARY KEY (service, tool, side, minute, shard);
ALTER TABLE tool_rollup_1m SET (fillfactor = 70);

ALTER TABLE mcp_method_rollup_1m ADD COLUMN shard smallint NOT NULL DEFAULT 0;
ALTER TABLE mcp_method_rollup_1m DROP CONSTRAINT mcp_method_rollup_1m_pkey,
    ADD PRIMARY KEY (service, method, side, minute, shard);
ALTER TABLE mcp_method_rollup_1m SET (fillfactor = 70);

ALTER TABLE llm_rollup_1m ADD COLUMN shard smallint NOT NULL DEFAULT 0;
ALTER TABLE llm_rollup_1m DROP CONSTRAINT llm_rollup_1m_pkey,
    ADD PRIMARY KEY (service, model, minute, shard);
ALTER TABLE llm_rollup_1m SET (fillfactor = 70);

ALTER TABLE upstream_rollup_1m ADD COLUMN shard smallint NOT NULL DEFAULT 0;
ALTER TABLE upstream_rollup_1m DROP CONSTRAINT upstream_rollup_1m_pkey,
    ADD PRIMARY KEY (service, server_address, minute, shard);
ALTER TABLE upstream_rollup_1m SET (fillfactor = 70);

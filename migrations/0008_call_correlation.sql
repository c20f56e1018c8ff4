-- The two sides of one tool call, and the nested client spans of one request, are joined after
-- they are stored (they arrive in different exports, from different processes, in any order).
--
-- tool_calls:
--   counted        false for a client span nested in another client span of the same call (the
--                  MCP SDK's `MCP send` span inside FastMCP's client span): stored for the links
--                  it carries, left out of every rollup.
--   inner_span_id  the span id of the nested client span (or OpenLLMetry's client
--                  `ResponseStreamWriter`) when it arrived in the same export and was not stored:
--                  the server span's parent may be that span.
--   peer_span_id   the other side's span of the same call, once both are stored.
--   own_outcome    what this side reported, when the call's outcome (known from the other side) differs.
--   overhead_us    client rows: the client's duration minus the server's (transport, queues).
ALTER TABLE tool_calls
    ADD COLUMN counted       boolean NOT NULL DEFAULT true,
    ADD COLUMN inner_span_id bytea,
    ADD COLUMN peer_span_id  bytea,
    ADD COLUMN own_outcome   text CHECK (own_outcome IN ('ok', 'error', 'cancelled')),
    ADD COLUMN overhead_us   bigint;

ALTER TABLE mcp_requests
    ADD COLUMN counted boolean NOT NULL DEFAULT true;

-- Transport overhead per tool: the client calls whose server side is stored, and the sum of
-- their overheads (the mean is overhead_us_sum / overhead_calls).
ALTER TABLE tool_rollup_1m
    ADD COLUMN overhead_calls  bigint NOT NULL DEFAULT 0,
    ADD COLUMN overhead_us_sum bigint NOT NULL DEFAULT 0;

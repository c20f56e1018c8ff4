-- Mean result size and item count divide by the results whose size / items were known, not by
-- every result with captured content: an instrumentation that keeps only part of a result
-- (OpenLLMetry's client keeps the first content part) leaves both unknown rather than wrong.
ALTER TABLE tool_rollup_1m
    ADD COLUMN sized_results   bigint NOT NULL DEFAULT 0,
    ADD COLUMN counted_results bigint NOT NULL DEFAULT 0;
-- Rows written before this migration counted every captured result as known.
UPDATE tool_rollup_1m SET sized_results = with_result, counted_results = with_result;

-- Rollup deltas are now aggregated by the writers and merged here a few hundred rows per batch.

-- Element-wise sum in one pass (unnest zips the arrays, padding the shorter with NULLs).
CREATE OR REPLACE FUNCTION toolsight_hist_add(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN a IS NULL THEN b
        WHEN b IS NULL THEN a
        ELSE (SELECT array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i)
              FROM unnest(a, b) WITH ORDINALITY AS u(x, y, i))
    END
$$;

#!/usr/bin/env bash
# Runs the README's test command N times in a row (default 5) while the machine is kept busy by a
# `toolsight serve` taking 20,000 spans/s from `toolsight-loadgen` (debug builds, both cores), and
# prints one line per run. Any other load can be added beside it (a parallel cargo build).
# Needs what `cargo test` needs; uses ports 24317/24318/29464 and the database toolsight_stress.
set -u
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build -q --workspace
B=target/debug/toolsight
(
    export TOOLSIGHT_DATABASE__URL=postgres://postgres@127.0.0.1:5432/toolsight_stress
    export TOOLSIGHT_OTLP__GRPC_LISTEN=127.0.0.1:24317 TOOLSIGHT_OTLP__HTTP_LISTEN=127.0.0.1:24318
    export TOOLSIGHT_ADMIN__LISTEN=127.0.0.1:29464
    exec $B serve
) >target/under-load-serve.log 2>&1 &
SERVE=$!
until curl -sf 127.0.0.1:29464/readyz >/dev/null; do sleep 0.5; done
${B}-loadgen --protocol grpc --endpoint 127.0.0.1:24317 --rate 20000 --duration 24h --quiet \
    >target/under-load-loadgen.log 2>&1 &
LOAD=$!
trap 'kill $LOAD $SERVE 2>/dev/null' EXIT
failed=0
for i in $(seq 1 "$runs"); do
    start=$(date +%s)
    cargo test --workspace >"target/under-load-run-$i.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || failed=$((failed + 1))
    echo "run $i: exit $rc in $(($(date +%s) - start)) s, load average $(cut -d' ' -f1-3 /proc/loadavg)"
done
echo "$((runs - failed)) of $runs runs passed"
[ $failed -eq 0 ]

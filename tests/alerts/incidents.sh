#!/usr/bin/env bash
# Time from onset to firing and from recovery to resolution, per incident kind, with the default
# rules, through the whole pipeline: `toolsight serve` (built-in rules, evaluated every minute)
# takes `toolsight-loadgen --scenario incidents` (healthy, every incident at once, healthy again,
# a third of DURATION each) and the alert events are read back from PostgreSQL.
# Usage: tests/alerts/incidents.sh [DURATION, default 30m]. The healthy third must be longer than
# the latency rule's window (10 m) for its baseline to exist. Alerts are then given 20 minutes to
# resolve (token burn's 30-minute window and 15-minute keep_firing_for take longer: "not
# resolved"). Uses ports 34317/34318/39464 and the database toolsight_incidents_bench.
set -eu
cd "$(dirname "$0")/../.."
duration=${1:-30m}
secs=$(python3 -c "import re,sys; d='$duration'; m=re.fullmatch(r'(\d+)([smh])',d); print(int(m[1])*{'s':1,'m':60,'h':3600}[m[2]])")
cargo build -q --workspace
B=${CARGO_TARGET_DIR:-target}/debug/toolsight
DB=postgres://postgres@127.0.0.1:5432/toolsight_incidents_bench
psql -q postgres://postgres@127.0.0.1:5432/postgres -c "DROP DATABASE IF EXISTS toolsight_incidents_bench" \
    -c "CREATE DATABASE toolsight_incidents_bench"
LOG=$(mktemp)
TOOLSIGHT_DATABASE__URL=$DB TOOLSIGHT_OTLP__GRPC_LISTEN=127.0.0.1:34317 \
    TOOLSIGHT_OTLP__HTTP_LISTEN=127.0.0.1:34318 TOOLSIGHT_ADMIN__LISTEN=127.0.0.1:39464 \
    $B serve >"$LOG" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null' EXIT
until curl -sf 127.0.0.1:39464/readyz >/dev/null; do sleep 0.5; done
start=$(date +%s)
echo "incidents timeline of $duration from $(date -u -d @"$start" +%T): onset at +$((secs / 3)) s, recovery at +$((2 * secs / 3)) s"
${B}-loadgen --scenario incidents --protocol grpc --endpoint 127.0.0.1:34317 --duration "$duration" --quiet >/dev/null
# Alerts resolve after keep_firing_for (up to 15 minutes): wait for every firing one to resolve.
deadline=$(($(date +%s) + 1200))
while [ "$(psql -tAq "$DB" -c "SELECT count(*) FROM alert_state WHERE phase = 'firing'")" != "0" ] \
    && [ "$(date +%s)" -lt "$deadline" ]; do sleep 10; done
onset=$((start + secs / 3))
recovery=$((start + 2 * secs / 3))
echo
echo "| alert | key | fired after onset | resolved after recovery |"
echo "|---|---|---|---|"
psql -tAq -F' ' "$DB" -c "
    SELECT alert, coalesce(labels->>'tool', labels->>'session', labels->>'upstream', ''),
           round(extract(epoch FROM min(at) FILTER (WHERE status = 'firing')))::bigint,
           round(extract(epoch FROM max(at) FILTER (WHERE status = 'resolved')))::bigint
    FROM alert_events GROUP BY 1, 2 ORDER BY 1, 2" |
while read -r alert key fired resolved; do
    f=$((fired - onset)); r=$([ -n "$resolved" ] && echo "$((resolved - recovery)) s" || echo "not resolved within 20 min")
    echo "| $alert | $key | ${f} s | $r |"
done

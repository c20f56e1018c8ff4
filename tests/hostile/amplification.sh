#!/usr/bin/env bash
# Decode amplification against a release `toolsight serve` (BENCHMARKS.md, "Hostile clients"):
# gzip bodies of empty spans (2 bytes each on the wire), the service's RSS and peak after each.
# Needs PostgreSQL on 127.0.0.1:5432, python3, curl, and `cargo build --release --workspace`.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=./target/release/toolsight
W=$(mktemp -d)
python3 - "$W" <<'PY'
import gzip, sys
def varint(n):
    out = b''
    while True:
        b, n = n & 0x7f, n >> 7
        if not n:
            return out + bytes([b])
        out += bytes([b | 0x80])
def nest(tag, inner):
    return bytes([tag]) + varint(len(inner)) + inner
for name, mib in [("bomb4", 4), ("bomb8", 8), ("bomb60", 60)]:
    spans = b'\x12\x00' * (mib * 1024 * 1024 // 2)   # ScopeSpans.spans: empty Span
    body = nest(0x0a, nest(0x12, spans))               # request → ResourceSpans → ScopeSpans
    open(f"{sys.argv[1]}/{name}.pb.gz", "wb").write(gzip.compress(body, 9))
PY
export TOOLSIGHT_DATABASE__URL=postgres://postgres@127.0.0.1:5432/toolsight_amp
export TOOLSIGHT_OTLP__GRPC_LISTEN=127.0.0.1:34317 TOOLSIGHT_OTLP__HTTP_LISTEN=127.0.0.1:34318
export TOOLSIGHT_ADMIN__LISTEN=127.0.0.1:39464
$B serve >"$W/serve.log" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true' EXIT
until curl -sf 127.0.0.1:39464/readyz >/dev/null; do sleep 0.2; done
rss() { grep -E "^(VmRSS|VmHWM)" /proc/$PID/status | tr -s ' \t' ' ' | tr '\n' ' '; }
post() {
    curl -s -o /dev/null -w "%{http_code} %{time_total}s " -H 'content-type: application/x-protobuf' \
        -H 'content-encoding: gzip' --data-binary "@$W/$1" http://127.0.0.1:34318/v1/traces
}
echo "idle: $(rss)"
echo "4 KiB gzip (4 MiB, 2.1M empty spans): $(post bomb4.pb.gz) $(rss)"
post bomb8.pb.gz >"$W/a" & P1=$!
post bomb8.pb.gz >"$W/b" & P2=$!
wait $P1 $P2
echo "two concurrent 8 KiB (8 MiB each): $(cat "$W/a" "$W/b") $(rss)"
echo "60 KiB gzip (60 MiB, 31M empty spans): $(post bomb60.pb.gz) $(rss)"
BOMBS=""
for _ in 1 2 3 4 5 6 7 8; do post bomb8.pb.gz >/dev/null & BOMBS="$BOMBS $!"; done
${B}-loadgen --protocol http-protobuf --endpoint 127.0.0.1:34318 --spans-per-request 1 \
    --concurrency 1 --rate 20 --duration 3s --quiet --json >"$W/small.json"
wait $BOMBS
echo "8 bombs beside a 1-span client: $(python3 -c "import json;d=json.load(open('$W/small.json'));print('p50', d['latency_p50_ms'], 'p99', d['latency_p99_ms'])") $(rss)"
sleep 5
echo "5 s later: $(rss)"
curl -s 127.0.0.1:39464/metrics | grep -E '^toolsight_exports_total\{.*too_large'

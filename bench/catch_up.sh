#!/usr/bin/env bash
# Recovery after a large change since the last checkpoint: a 1M-row table and a GROUP BY
# view are checkpointed, every row is updated (1M deleted and 1M inserted rows since the
# checkpoint), the server is killed with kill -9 and started again; prints the restarted
# server's peak RSS (VmHWM) and the seconds until the view answers, and checks the answer.
# Usage: bench/catch_up.sh [millrace binary] [serve options, e.g. --memory-limit 512MiB]
set -euo pipefail
BIN="${1:-${CARGO_TARGET_DIR:-$HOME/.cache/millrace/target}/release/millrace}"
shift || true
PORT=56611
work=$(mktemp -d)
P="psql -h 127.0.0.1 -p $PORT -U millrace -d millrace -qAtX"
serve() { "$BIN" serve --listen 127.0.0.1:$PORT --data-dir "$work/data" --checkpoint-interval-ms 3600000 "$@" 2>>"$work/log" & }
pid=
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
serve "$@"; pid=$!
until $P -c "SELECT 1" >/dev/null 2>&1; do sleep 0.1; done
$P -c "CREATE TABLE t (k BIGINT, v BIGINT, pad TEXT)"
$P -c "INSERT INTO t SELECT value, value, repeat('p', 100) FROM generate_series(1, 1000000)"
$P -c "CREATE MATERIALIZED VIEW g AS SELECT k % 1000 AS b, count(*) AS n, sum(v) AS s FROM t GROUP BY k % 1000"
$P -c "SELECT count(*) FROM g" >/dev/null
$P -c "CHECKPOINT"
$P -c "UPDATE t SET v = v + 1, pad = repeat('q', 100)"
$P -c "SELECT count(*) FROM g" >/dev/null
kill -9 $pid; wait $pid 2>/dev/null || true
start=$(date +%s.%N)
serve "$@"; pid=$!
until $P -c "SELECT 1" >/dev/null 2>&1; do sleep 0.05; done
got=$($P -c "SELECT sum(s) FROM g")
end=$(date +%s.%N)
want=$($P -c "SELECT sum(v) FROM t")
[ "$got" = "$want" ] || { echo "view sum $got, table sum $want" >&2; exit 1; }
echo "catch-up of 2M changed rows after kill -9 ($*): peak RSS $(awk '/VmHWM/ {print int($2/1024)}' /proc/$pid/status) MiB, view answered after $(echo "$end - $start" | bc) s"

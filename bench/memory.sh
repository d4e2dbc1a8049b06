#!/usr/bin/env bash
# The memory matrix: each case runs on a fresh server under --memory-limit (default 256MiB)
# and prints its peak resident memory (VmHWM) next to the bound it must stay within, 1.2 x
# the limit plus the idle server's RSS, and the time the case took. A case's views are read
# (fresh reads wait for them) before the peak is taken. Measured, not timed: nothing fails
# on a slow machine, a case over its bound prints OVER.
# Usage: bench/memory.sh [millrace binary] [case...]; BENCH_LIMIT (256MiB), BENCH_SCALE
# (1: 1M wide rows, 5M narrow ones; 0.2 for a fifth). Cases: copy-wide copy-narrow
# issue-shape insert-select update-all delete-all text-aggregates wide-join topn
# window ten-views adhoc-spilled.
set -euo pipefail
BIN="${1:-${CARGO_TARGET_DIR:-$HOME/.cache/millrace/target}/release/millrace}"
shift || true
LIMIT="${BENCH_LIMIT:-256MiB}"
SCALE="${BENCH_SCALE:-1}"
PORT=56631
work=$(mktemp -d)
pid=
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
P() { psql -h 127.0.0.1 -p $PORT -U millrace -d millrace -qAtX "$@"; }
rows() { python3 -c "print(int($1 * $SCALE))"; }
limit_bytes=$(python3 -c "
s='$LIMIT'; u={'KiB':1<<10,'MiB':1<<20,'GiB':1<<30}
print(next(int(s[:-3])*v for k,v in u.items() if s.endswith(k)))")
start() {
  rm -rf "$work/data"
  "$BIN" serve --listen 127.0.0.1:$PORT --data-dir "$work/data" --memory-limit "$LIMIT" 2>"$work/log" &
  pid=$!
  until P -c "SELECT 1" >/dev/null 2>&1; do sleep 0.1; done
}
stop() { kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; pid=; }
field() { awk -v f="$1" '$1 == f {print $2 * 1024}' /proc/$pid/status; }
idle() { sleep 2; idle_rss=$(field VmRSS:); echo 5 > /proc/$pid/clear_refs; t0=$(date +%s.%N); }
report() {
  local peak bound secs verdict
  peak=$(field VmHWM:)
  bound=$(python3 -c "print(int($limit_bytes * 1.2 + $idle_rss))")
  secs=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")
  verdict=ok; [ "$peak" -gt "$bound" ] && verdict=OVER
  printf '| %s | %d | %d | %d | %s | %s |\n' "$1" $((idle_rss >> 20)) $((peak >> 20)) \
    $((bound >> 20)) "$secs" "$verdict"
}
# COPY text of N rows: id, id % groups, a pad of W characters.
copy_data() { python3 - "$@" <<'EOF'
import sys
n, groups, width, first = map(int, sys.argv[1:5])
pad = 'p' * width
out = sys.stdout
for i in range(first, first + n):
    out.write(f"{i}\t{(i * 7919) % groups}\t{pad}\n")
EOF
}

case_copy_wide() {
  P -c "CREATE TABLE t (id BIGINT PRIMARY KEY, k BIGINT, pad TEXT)"
  P -c "CREATE MATERIALIZED VIEW a AS SELECT k % 1000 AS b, count(*) AS n FROM t GROUP BY 1"
  P -c "CREATE MATERIALIZED VIEW c AS SELECT count(*) AS n, sum(length(pad)) AS chars FROM t"
  copy_data "$(rows 1000000)" 1000000 300 0 > "$work/in.tsv"
  idle
  P -c "COPY t FROM STDIN" < "$work/in.tsv" >/dev/null
  P -c "SELECT sum(n) FROM a" >/dev/null
  report "one COPY of $(rows 1000000) wide rows (300 characters) under a key, two views"
}
case_copy_narrow() {
  P -c "CREATE TABLE t (id BIGINT, k BIGINT, pad TEXT)"
  P -c "CREATE MATERIALIZED VIEW a AS SELECT k % 1000 AS b, count(*) AS n FROM t GROUP BY 1"
  copy_data "$(rows 5000000)" 1000 1 0 > "$work/in.tsv"
  idle
  P -c "COPY t FROM STDIN" < "$work/in.tsv" >/dev/null
  P -c "SELECT sum(n) FROM a" >/dev/null
  report "one COPY of $(rows 5000000) narrow rows, a view"
}
case_issue_shape() {
  P -c "CREATE TABLE t (id BIGINT PRIMARY KEY, k BIGINT, pad TEXT)"
  P -c "CREATE MATERIALIZED VIEW v AS SELECT k, count(*) AS n, max(pad) AS m FROM t GROUP BY k"
  copy_data "$(rows 500000)" 2000000 300 0 > "$work/in.tsv"
  idle
  for i in 0 1 2 3; do
    copy_data "$(rows 500000)" 2000000 300 $((i * 1000000)) > "$work/in.tsv"
    P -c "COPY t FROM STDIN" < "$work/in.tsv" >/dev/null
  done
  P -c "SELECT count(*) FROM v" >/dev/null
  report "four COPYs of $(rows 500000) rows under GROUP BY k, max(pad) over 2M keys"
}
case_insert_select() {
  P -c "CREATE TABLE t (id BIGINT, k BIGINT, pad TEXT)"
  P -c "CREATE MATERIALIZED VIEW a AS SELECT k, count(*) AS n FROM t GROUP BY k"
  idle
  P -c "INSERT INTO t SELECT value, value % 1000, 'row ' || value FROM generate_series(1, $(rows 5000000))"
  P -c "SELECT sum(n) FROM a" >/dev/null
  report "INSERT ... SELECT of $(rows 5000000) rows, a view"
}
load_wide() {
  P -c "CREATE TABLE t (id BIGINT PRIMARY KEY, k BIGINT, pad TEXT)"
  P -c "CREATE MATERIALIZED VIEW a AS SELECT k % 1000 AS b, count(*) AS n, max(id) AS m FROM t GROUP BY 1"
  copy_data "$(rows 1000000)" 1000000 100 0 > "$work/in.tsv"
  P -c "COPY t FROM STDIN" < "$work/in.tsv" >/dev/null
  P -c "SELECT sum(n) FROM a" >/dev/null
}
case_update_all() {
  load_wide; idle
  P -c "UPDATE t SET k = k + 1, pad = 'q' || pad"
  P -c "SELECT sum(n) FROM a" >/dev/null
  report "UPDATE of every row ($(rows 1000000), 100 characters)"
}
case_delete_all() {
  load_wide; idle
  P -c "DELETE FROM t"
  P -c "SELECT sum(n) FROM a" >/dev/null
  report "DELETE of every row ($(rows 1000000))"
}
case_text_aggregates() {
  P -c "CREATE TABLE t (id BIGINT, k BIGINT, pad TEXT)"
  P -c "CREATE MATERIALIZED VIEW a AS SELECT k, max(pad) AS mx, min(pad) AS mn, count(DISTINCT pad) AS d FROM t GROUP BY k"
  P -c "CREATE MATERIALIZED VIEW s AS SELECT k % 100 AS b, length(string_agg(pad, ',')) AS l, cardinality(array_agg(pad)) AS c FROM t GROUP BY 1"
  idle
  P -c "INSERT INTO t SELECT value, value % 100000, md5(value::text) || repeat('x', 100) FROM generate_series(1, $(rows 1000000))"
  P -c "SELECT count(*) FROM a" >/dev/null; P -c "SELECT count(*) FROM s" >/dev/null
  report "text state: max, min, count DISTINCT, string_agg, array_agg over $(rows 1000000) rows"
}
case_wide_join() {
  P -c "CREATE TABLE f (id BIGINT, d BIGINT)"
  P -c "CREATE TABLE d (id BIGINT PRIMARY KEY, pad TEXT)"
  P -c "CREATE MATERIALIZED VIEW j AS SELECT f.d % 100 AS b, count(*) AS n, sum(length(d.pad)) AS l FROM f JOIN d ON f.d = d.id GROUP BY 1"
  idle
  P -c "INSERT INTO d SELECT value, repeat('w', 500) FROM generate_series(1, $(rows 300000))"
  P -c "INSERT INTO f SELECT value, value % $(rows 300000) + 1 FROM generate_series(1, $(rows 1000000))"
  P -c "SELECT sum(n) FROM j" >/dev/null
  report "a join with a wide side ($(rows 300000) rows of 500 characters)"
}
case_topn() {
  P -c "CREATE TABLE t (id BIGINT, k BIGINT, v BIGINT)"
  P -c "CREATE MATERIALIZED VIEW top AS SELECT k, id, v FROM (SELECT k, id, v, row_number() OVER (PARTITION BY k ORDER BY v DESC) AS r FROM t) x WHERE r <= 3"
  P -c "CREATE MATERIALIZED VIEW best AS SELECT id, v FROM t ORDER BY v DESC LIMIT 10"
  idle
  P -c "INSERT INTO t SELECT value, value % 200000, (value * 7919) % 1000003 FROM generate_series(1, $(rows 2000000))"
  P -c "SELECT count(*) FROM top" >/dev/null; P -c "SELECT count(*) FROM best" >/dev/null
  report "ROW_NUMBER over 200k partitions and a TopN, $(rows 2000000) rows"
}
case_window() {
  P -c "CREATE TABLE t (id BIGINT, k BIGINT, v BIGINT, pad TEXT)"
  P -c "CREATE MATERIALIZED VIEW w AS SELECT id, pad, k % 10 AS p, row_number() OVER (PARTITION BY k % 10 ORDER BY v, id) AS rn, rank() OVER (PARTITION BY k % 10 ORDER BY v, id) AS rk FROM t"
  idle
  P -c "INSERT INTO t SELECT value, value % 1000, (value * 7919) % 1000003, repeat('p', 200) FROM generate_series(1, $(rows 1000000))"
  P -c "SELECT count(*) FROM w" >/dev/null
  report "ROW_NUMBER and RANK over 10 partitions, $(rows 1000000) rows of 200 characters"
}
case_ten_views() {
  P -c "CREATE TABLE t (id BIGINT, k BIGINT, pad TEXT)"
  for i in $(seq 1 10); do
    P -c "CREATE MATERIALIZED VIEW v$i AS SELECT k % ($i * 100) AS b, count(*) AS n, max(pad) AS m FROM t GROUP BY 1"
  done
  idle
  P -c "INSERT INTO t SELECT value, value, repeat('t', 100) FROM generate_series(1, $(rows 1000000))"
  for i in $(seq 1 10); do P -c "SELECT sum(n) FROM v$i" >/dev/null; done
  report "ten views over one table ($(rows 1000000) rows)"
}
case_adhoc_spilled() {
  load_wide; idle
  P -c "SELECT k % 50000 AS b, count(*), max(pad) FROM t GROUP BY 1 ORDER BY 3 DESC, 1 LIMIT 5" >/dev/null || true
  P -c "SELECT id, pad FROM t ORDER BY pad DESC, id LIMIT 5" >/dev/null || true
  report "ad-hoc GROUP BY and ORDER BY over a spilled table ($(rows 1000000) rows)"
}

cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(copy-wide copy-narrow issue-shape insert-select update-all delete-all
  text-aggregates wide-join topn window ten-views adhoc-spilled)
echo "millrace: $("$BIN" --version), --memory-limit $LIMIT, scale $SCALE"
echo "| case | idle RSS MiB | peak RSS MiB | bound MiB | seconds | |"
echo "|---|---:|---:|---:|---:|---|"
for c in "${cases[@]}"; do
  start
  "case_${c//-/_}"
  stop
done

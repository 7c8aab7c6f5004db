#!/usr/bin/env bash
# Instructions per Get in the sidecar, or in the no-op floor, counted by callgrind
# (repeatable whatever else the machine does), and the functions that cost the most.
#
#   bench/callgrind-get.sh [DATABASE_URL]             # default: a temporary SQLite file
#   TARGET=floor bench/callgrind-get.sh               # the floor answering the same Gets
#
# Builds unstripped release binaries in target/profiling (the release profile plus
# symbols; or SIDECAR_BINARY=path for the sidecar), runs the harness against the
# target under valgrind with instrumentation switched on only for the closed-loop
# Get run (after the preload), and prints Ir per Get: instructions divided by the
# calls of the generated server's Get handler (`GetSvc … ::call`, one per Get,
# the same code in both targets). Needs valgrind (Debian: valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
url="${1:-sqlite}"
target="${TARGET:-sidecar}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

profile=(env CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only)
if [ -z "${SIDECAR_BINARY:-}" ]; then
  "${profile[@]}" cargo build --release --locked -p docsidecar --bin docsidecar --target-dir target/profiling
fi
binary="${SIDECAR_BINARY:-$PWD/target/profiling/release/docsidecar}"
"${profile[@]}" cargo build --release --locked -p docsidecar-bench --target-dir target/profiling
bench="$PWD/target/profiling/release/docsidecar-bench"

printf '#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=%s/callgrind.%%p.out "$@"\n' \
  "$work" > "$work/valgrind"
printf '#!/bin/sh\nexec %s %s "$@"\n' "$work/valgrind" "$binary" > "$work/sidecar"
chmod +x "$work/valgrind" "$work/sidecar"

if [ "$target" = floor ]; then
  export DOCSIDECAR_BENCH_FLOOR_WRAPPER="$work/valgrind"
  served="$bench floor-server"
else
  served="$binary serve"
fi
"$bench" --database-url "$url" --sidecar "$work/sidecar" \
  --workloads get --targets "$target" --concurrency 1 --warmup 0.5 --duration 8 \
  --open-duration 0.5 --rate 100 --startup-runs 0 --no-png --out "$work/out" \
  >"$work/run.txt" 2>&1 &
harness=$!
# The sidecar is measured after the preload; the floor (canned answers) once it runs.
for _ in $(seq 1 480); do grep -q "preloaded" "$work/run.txt" && break; sleep 0.5; done
pid="$(pgrep -f "valgrind.*$served" | head -n1)"
callgrind_control -i on "$pid" >/dev/null
for _ in $(seq 1 480); do grep -q "^get   closed" "$work/run.txt" && break; sleep 0.5; done
# Dumped now: the harness kills the floor at the end, before valgrind could write.
callgrind_control -d "$pid" >/dev/null
callgrind_control -i off "$pid" >/dev/null
wait "$harness" || { cat "$work/run.txt"; exit 1; }

out="$work/callgrind.$pid.out.1"
total="$(callgrind_annotate "$out" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')"
gets="$(callgrind_annotate --inclusive=yes --tree=caller "$out" \
  | grep -oE "GetSvc<T> as tonic::server::service::UnaryService<docsidecar::proto::GetRequest>>::call::\{\{closure\}\} \([0-9,]+x\)" \
  | head -n1 | sed -E 's/.*\(([0-9,]+)x\).*/\1/' | tr -d ,)"
echo "$target: Gets counted: $gets; instructions: $total; per Get: $((total / gets))"
grep -E "^get   closed" "$work/run.txt" || true
echo
callgrind_annotate --inclusive=yes "$out" | grep -E "^ *[0-9,]+ \(" \
  | grep -E "docsidecar|tracing_subscriber|serde_json|prost::|sqlite3_step|tokio_postgres::query|h2::|hyper::|tonic::|malloc|memcpy|memmove" \
  | head -n 40 | cut -c1-200

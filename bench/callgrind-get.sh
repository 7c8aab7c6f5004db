#!/usr/bin/env bash
# Instructions per Get in the sidecar, counted by callgrind (repeatable whatever
# else the machine does), and the functions that cost the most.
#
#   bench/callgrind-get.sh [DATABASE_URL]      # default: a temporary SQLite file
#
# Builds an unstripped release binary in target/profiling (the release profile
# plus symbols; or SIDECAR_BINARY=path), runs the harness against it under valgrind with instrumentation
# switched on only for the closed-loop Get run (after the preload), and prints
# Ir per Get (instructions / calls of wire::Data::from_json, one per Get) and the
# top inclusive costs. Needs valgrind (Debian: valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
url="${1:-sqlite}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# SIDECAR_BINARY=path: profile that (unstripped) binary instead of building one.
if [ -z "${SIDECAR_BINARY:-}" ]; then
  CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
    cargo build --release --locked -p docsidecar --bin docsidecar --target-dir target/profiling
fi
binary="${SIDECAR_BINARY:-$PWD/target/profiling/release/docsidecar}"
cargo build --release --locked -p docsidecar-bench

cat > "$work/sidecar" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$work/callgrind.%p.out "$binary" "\$@"
EOF
chmod +x "$work/sidecar"

target/release/docsidecar-bench --database-url "$url" --sidecar "$work/sidecar" \
  --workloads get --targets sidecar --concurrency 1 --warmup 0.5 --duration 8 \
  --open-duration 0.5 --rate 100 --startup-runs 0 --no-png --out "$work/out" \
  >"$work/run.txt" 2>&1 &
bench=$!
for _ in $(seq 1 240); do grep -q preloaded "$work/run.txt" && break; sleep 0.5; done
pid="$(pgrep -f "valgrind.*$binary serve" | head -n1)"
callgrind_control -i on "$pid" >/dev/null
for _ in $(seq 1 240); do grep -q "^get   closed" "$work/run.txt" && break; sleep 0.5; done
callgrind_control -i off "$pid" >/dev/null
wait "$bench" || { cat "$work/run.txt"; exit 1; }

out="$(ls "$work"/callgrind."$pid".out*)"
total="$(callgrind_annotate "$out" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')"
gets="$(callgrind_annotate --inclusive=yes --tree=caller "$out" \
  | grep -E "=> .*wire.rs:docsidecar::wire::Data::from_json \(" | head -n1 \
  | sed -E 's/.*\(([0-9,]+)x\).*/\1/' | tr -d ,)"
echo "Gets counted: $gets; instructions: $total; per Get: $((total / gets))"
echo
callgrind_annotate --inclusive=yes "$out" | grep -E "^ *[0-9,]+ \(" \
  | grep -E "docsidecar::|tracing_subscriber|serde_json|prost::|sqlite3_step|tokio_postgres::query|h2::|malloc|memcpy|memmove" \
  | head -n 40 | cut -c1-200

#!/usr/bin/env bash
# Loopback load test of the gateway (`keygate serve`), with and without the keygate stack.
#
# Builds the `keygate` binary (gateway with its embedded mock upstream, and the CLI) in release mode,
# creates a throw-away key with all permissions and no limits, then for each mode (see
# start_gateway below: bare, keygate, logged) starts the gateway on 127.0.0.1 (a free port),
# drives it with `wrk`
# for DURATION per scenario, and stops it. Prints requests/s, p50 and p99 latency per
# scenario and the ratios to bare. Everything stays on loopback and stops by itself.
#
#   scripts/load.sh                         # 10 s per scenario and mode, 32 connections
#   DURATION=5s CONNECTIONS=64 scripts/load.sh
#
# Needs `wrk`; installs it with apt-get when missing.
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
# Scenarios: NAME METHOD PATH (POST bodies are a small chat request).
SCENARIOS=("models GET /v1/models" "chat POST /v1/chat/completions")

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if ! command -v wrk >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "installing wrk..." >&2
        apt-get update -qq && apt-get install -y -qq wrk >/dev/null
    else
        echo "error: wrk not found (Debian/Ubuntu: apt-get install -y wrk)" >&2
        exit 1
    fi
fi

echo "building keygate (release)..." >&2
cargo build --quiet --release -p keygate-cli --bin keygate
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
keygate_bin="$target_dir/release/keygate"

work=$(mktemp -d)
gateway_pid=""
cleanup() {
    if [[ -n "$gateway_pid" ]] && kill -0 "$gateway_pid" 2>/dev/null; then
        kill "$gateway_pid" 2>/dev/null || true
        wait "$gateway_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# A key with every permission and no limits: the run measures the stack, not its refusals.
secret=$("$keygate_bin" --file "$work/keys.toml" --json keys create \
    --project load --create-project --name load --permissions all |
    grep -o '"secret": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/')
if [[ -z "$secret" ]]; then
    echo "error: could not create a key with $keygate_bin" >&2
    exit 1
fi

cat >"$work/chat.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $secret"
wrk.body = '{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"Say hello to the load test."}]}'
EOF
cat >"$work/get.lua" <<EOF
wrk.headers["Authorization"] = "Bearer $secret"
EOF

# Starts the gateway in mode $1 and sets $addr. Modes:
#   bare     the same listener and proxy with no keygate layer (--without-keygate)
#   keygate  the full stack, audit records to a JSON Lines file (written by a background
#            thread), tracing off: how a production gateway would run it
#   logged   the full stack with the example's defaults: every audit record also formatted
#            as a tracing event on stderr (here redirected to a file)
start_gateway() {
    local mode=$1 extra=()
    case "$mode" in
    bare) extra=(--without-keygate --keys-file "$work/keys.toml") ;;
    keygate)
        printf 'keys_file = "%s"\n[audit]\ntracing = false\n[audit.jsonl]\npath = "%s"\n' \
            "$work/keys.toml" "$work/audit.jsonl" >"$work/keygate.toml"
        extra=(--config "$work/keygate.toml")
        ;;
    logged) extra=(--keys-file "$work/keys.toml") ;;
    esac
    "$keygate_bin" serve --listen 127.0.0.1:0 "${extra[@]}" \
        >"$work/gateway.out" 2>"$work/gateway.err" &
    gateway_pid=$!
    addr=""
    for _ in $(seq 1 100); do
        addr=$(sed -n 's/^keygate gateway listening on \(http:\/\/[0-9.:]*\).*/\1/p' "$work/gateway.out" | head -1)
        [[ -n "$addr" ]] && return 0
        if ! kill -0 "$gateway_pid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "error: the gateway ($mode) did not start:" >&2
    cat "$work/gateway.err" >&2
    exit 1
}

stop_gateway() {
    kill "$gateway_pid" 2>/dev/null || true
    wait "$gateway_pid" 2>/dev/null || true
    gateway_pid=""
}

# wrk's latency ("850.00us", "1.23ms", "2.00s") in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else { printf "%s", v }
    }'
}

declare -A RPS P50 P99 ERRS
run_mode() {
    local mode=$1
    start_gateway "$mode"
    for scenario in "${SCENARIOS[@]}"; do
        read -r name method path <<<"$scenario"
        local script="$work/get.lua"
        [[ "$method" == POST ]] && script="$work/chat.lua"
        # A short warm-up (connections, caches), then the measured run.
        wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s "$script" "$addr$path" >/dev/null
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$script" "$addr$path" >"$work/wrk.out"
        RPS[$mode.$name]=$(awk '/^Requests\/sec:/ {print $2}' "$work/wrk.out")
        P50[$mode.$name]=$(to_ms "$(awk '$1 == "50%" {print $2}' "$work/wrk.out")")
        P99[$mode.$name]=$(to_ms "$(awk '$1 == "99%" {print $2}' "$work/wrk.out")")
        ERRS[$mode.$name]=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$work/wrk.out")
        ERRS[$mode.$name]=${ERRS[$mode.$name]:-0}
        echo "$mode $name: ${RPS[$mode.$name]} req/s, p50 ${P50[$mode.$name]} ms, p99 ${P99[$mode.$name]} ms, non-2xx ${ERRS[$mode.$name]}" >&2
    done
    stop_gateway
}

modes=(bare keygate logged)
for mode in "${modes[@]}"; do
    run_mode "$mode"
done

echo
echo "## Gateway load ($(nproc) cores, wrk -t$THREADS -c$CONNECTIONS, $DURATION per run, loopback, mock upstream)"
echo
echo "| scenario | mode | requests/s | p50 | p99 | non-2xx |"
echo "| --- | --- | --- | --- | --- | --- |"
for scenario in "${SCENARIOS[@]}"; do
    read -r name method path <<<"$scenario"
    for mode in "${modes[@]}"; do
        echo "| $method $path | $mode | ${RPS[$mode.$name]} | ${P50[$mode.$name]} ms | ${P99[$mode.$name]} ms | ${ERRS[$mode.$name]} |"
    done
done
echo
for scenario in "${SCENARIOS[@]}"; do
    read -r name method path <<<"$scenario"
    for mode in keygate logged; do
        awk -v n="$method $path" -v m="$mode" -v k="${RPS[$mode.$name]}" -v b="${RPS[bare.$name]}" \
            -v k50="${P50[$mode.$name]}" -v b50="${P50[bare.$name]}" \
            -v k99="${P99[$mode.$name]}" -v b99="${P99[bare.$name]}" 'BEGIN {
            printf "%s: throughput %s/bare = %.2f (target >= 0.90); p50 %+.3f ms; p99 %+.3f ms\n",
                n, m, k / b, k50 - b50, k99 - b99
        }'
    done
done

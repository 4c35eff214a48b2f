#!/usr/bin/env bash
# Loopback load test of the gateway (`keygate serve`), with and without the keygate stack.
#
# Builds the `keygate` binary (gateway with its embedded mock upstream, and the CLI) in release mode,
# creates a throw-away key with all permissions and no limits (and a metered one), then for each
# mode (see start_gateway below: bare, keygate, logged, metered_memory, metered_ledger,
# metered_console) starts the
# gateway on 127.0.0.1 (a free port),
# drives it with `wrk`
# for DURATION per scenario, and stops it. Prints requests/s, p50 and p99 latency per
# scenario and the ratios to bare. Everything stays on loopback and stops by itself.
#
#   scripts/load.sh                         # 3 interleaved rounds, 10 s per scenario and mode, 32 connections
#   ROUNDS=5 DURATION=5s CONNECTIONS=64 scripts/load.sh
#   MODES="metered_memory metered_ledger" scripts/load.sh   # what the SQLite spend ledger costs
#   MODES="metered_ledger metered_console" scripts/load.sh  # the data plane while the console is in use
#
# Needs `wrk`; installs it with apt-get when missing.
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
ROUNDS=${ROUNDS:-3}
read -r -a modes <<<"${MODES:-bare keygate logged}"
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

# A metered key: a money budget and a tokens-per-minute limit, both far from reached, so every
# chat request is reserved (and, with the ledger, committed) and settled. Created in a SQLite
# store (served with its spend ledger) and exported as a TOML key file (served with spend in
# memory only).
metered=$("$keygate_bin" --store "sqlite:$work/metered.db" --json keys create \
    --project metered --create-project --name metered --permissions all \
    --budget 1000000/day --tpm 1000000000000 |
    grep -o '"secret": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/')
"$keygate_bin" --store "sqlite:$work/metered.db" keys export --output "$work/metered.toml" >/dev/null
metered_id=$("$keygate_bin" --store "sqlite:$work/metered.db" --json keys list |
    grep -o '"id": *"key_[^"]*"' | head -1 | sed 's/.*"\(key_[^"]*\)"$/\1/')
admin_secret=$("$keygate_bin" --store "sqlite:$work/metered.db" --json admin-keys create \
    --name load --scope manage | grep -o '"secret": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/')

cat >"$work/chat.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $secret"
wrk.body = '{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"Say hello to the load test."}]}'
EOF
cat >"$work/get.lua" <<EOF
wrk.headers["Authorization"] = "Bearer $secret"
EOF
sed "s/$secret/$metered/" "$work/chat.lua" >"$work/metered_chat.lua"
sed "s/$secret/$metered/" "$work/get.lua" >"$work/metered_get.lua"

# Starts the gateway in mode $1 and sets $addr. Modes:
#   bare     the same listener and proxy with no keygate layer (--without-keygate)
#   keygate  the full stack, audit records to a JSON Lines file (written by a background
#            thread), tracing off: how a production gateway would run it
#   logged   the full stack with the example's defaults: every audit record also formatted
#            as a tracing event on stderr (here redirected to a file)
#   metered_memory, metered_ledger  a metered key (budget and tokens per minute), spend in
#            memory or in the SQLite ledger
#   metered_console  metered_ledger while someone uses the admin console: a logged-in session
#            loads the keys list and the metered key's page (spend, usage, chart, changes)
#            CONSOLE_PAGES_PER_SEC times a second at most (default 10) for the whole run, one
#            curl each (CONSOLE_PAGES="/healthz" measures what the curls alone cost)
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
    metered_memory | metered_ledger | metered_console)
        printf '[audit]\ntracing = false\n[audit.jsonl]\npath = "%s"\n[prices."gpt-4o-mini"]\ninput_per_million = "0.15"\noutput_per_million = "0.60"\n' \
            "$work/audit.jsonl" >"$work/metered.toml.conf"
        if [[ "$mode" == metered_memory ]]; then
            printf 'keys_file = "%s"\n' "$work/metered.toml" | cat - "$work/metered.toml.conf" >"$work/keygate.toml"
        else
            printf 'store = "sqlite:%s"\n' "$work/metered.db" | cat - "$work/metered.toml.conf" >"$work/keygate.toml"
        fi
        extra=(--config "$work/keygate.toml")
        ;;
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

# The console in use: log in with the admin key, then load two pages in turn, at
# CONSOLE_PAGES_PER_SEC, until stopped; each page's status goes to $work/console.log.
console_pid=""
start_console() {
    curl -s -o /dev/null -c "$work/cookies" --data-urlencode "admin_key=$admin_secret" "$addr/admin/login"
    local pause
    pause=$(awk -v r="${CONSOLE_PAGES_PER_SEC:-10}" 'BEGIN { printf "%.3f", 1 / r }')
    : >"$work/console.log"
    (
        while true; do
            for page in ${CONSOLE_PAGES:-/admin/keys /admin/keys/KEY}; do
                page=${page//KEY/$metered_id}
                curl -s -o /dev/null -w '%{http_code} %{time_total}\n' -b "$work/cookies" "$addr$page" >>"$work/console.log"
                sleep "$pause"
            done
        done
    ) &
    console_pid=$!
}

stop_console() {
    if [[ -n "$console_pid" ]]; then
        kill "$console_pid" 2>/dev/null || true
        wait "$console_pid" 2>/dev/null || true
        console_pid=""
        local pages ok
        pages=$(wc -l <"$work/console.log")
        ok=$(grep -c '^200 ' "$work/console.log" || true)
        echo "console: $pages pages loaded ($ok with 200), median $(awk '{print $2 * 1000}' "$work/console.log" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }') ms" >&2
        if [[ "$ok" != "$pages" ]]; then
            echo "error: the console answered something else than 200" >&2
            exit 1
        fi
    fi
}

stop_gateway() {
    stop_console
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

# User + system CPU ticks of process $1 so far.
cpu_ticks() {
    awk '{ print $14 + $15 }' "/proc/$1/stat"
}

# Each value is a space-separated list, one entry per round.
declare -A RPS P50 P99 ERRS CPU
run_mode() {
    local mode=$1
    start_gateway "$mode"
    [[ "$mode" == metered_console ]] && start_console
    for scenario in "${SCENARIOS[@]}"; do
        read -r name method path <<<"$scenario"
        local script="$work/get.lua"
        [[ "$method" == POST ]] && script="$work/chat.lua"
        if [[ "$mode" == metered_* ]]; then
            script="$work/metered_get.lua"
            [[ "$method" == POST ]] && script="$work/metered_chat.lua"
        fi
        # A short warm-up (connections, caches), then the measured run.
        wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s "$script" "$addr$path" >/dev/null
        local cpu_before cpu_after
        cpu_before=$(cpu_ticks "$gateway_pid")
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$script" "$addr$path" >"$work/wrk.out"
        cpu_after=$(cpu_ticks "$gateway_pid")
        local rps p50 p99 errs cpu requests
        rps=$(awk '/^Requests\/sec:/ {print $2}' "$work/wrk.out")
        p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$work/wrk.out")")
        p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$work/wrk.out")")
        errs=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$work/wrk.out")
        errs=${errs:-0}
        requests=$(awk '/requests in/ {print $1}' "$work/wrk.out")
        # CPU time of the gateway process (with its in-process mock upstream) per request.
        cpu=$(awk -v a="$cpu_before" -v b="$cpu_after" -v n="$requests" -v hz="$(getconf CLK_TCK)" \
            'BEGIN { printf "%.1f", (b - a) / hz * 1e6 / n }')
        CPU[$mode.$name]+="$cpu "
        RPS[$mode.$name]+="$rps "
        P50[$mode.$name]+="$p50 "
        P99[$mode.$name]+="$p99 "
        ERRS[$mode.$name]+="$errs "
        echo "round $round $mode $name: $rps req/s, p50 $p50 ms, p99 $p99 ms, non-2xx $errs, gateway CPU $cpu us/request" >&2
    done
    stop_gateway
}

# The median of the numbers given.
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR % 2) printf "%.3f", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Rounds interleave the modes (bare, keygate, logged, bare, ...) so a slow spell of the machine
# falls on all of them; the report gives medians, and the median of the per-round ratios.
for round in $(seq 1 "$ROUNDS"); do
    for mode in "${modes[@]}"; do
        run_mode "$mode"
    done
done

echo
echo "## Gateway load ($(nproc) cores, wrk -t$THREADS -c$CONNECTIONS, $ROUNDS interleaved rounds of $DURATION, loopback, mock upstream)"
echo
echo "| scenario | mode | requests/s (median) | p50 | p99 | gateway CPU per request | non-2xx (all rounds) |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for scenario in "${SCENARIOS[@]}"; do
    read -r name method path <<<"$scenario"
    for mode in "${modes[@]}"; do
        # shellcheck disable=SC2086
        errs=$(printf '%s\n' ${ERRS[$mode.$name]} | awk '{ s += $1 } END { print s }')
        # shellcheck disable=SC2086
        echo "| $method $path | $mode | $(median ${RPS[$mode.$name]}) | $(median ${P50[$mode.$name]}) ms | $(median ${P99[$mode.$name]}) ms | $(median ${CPU[$mode.$name]}) µs | $errs |"
    done
done
echo
# Each mode against its baseline: bare for the stack, spend in memory for the ledger.
baseline_of() {
    case "$1" in
    keygate | logged) echo bare ;;
    metered_ledger) echo metered_memory ;;
    metered_console) echo metered_ledger ;;
    esac
}
for scenario in "${SCENARIOS[@]}"; do
    read -r name method path <<<"$scenario"
    for mode in "${modes[@]}"; do
        base=$(baseline_of "$mode")
        [[ -n "$base" && -n "${RPS[$base.$name]:-}" ]] || continue
        # shellcheck disable=SC2206
        bare=(${RPS[$base.$name]})
        # shellcheck disable=SC2206
        this=(${RPS[$mode.$name]})
        ratios=()
        for i in "${!bare[@]}"; do
            ratios+=("$(awk -v k="${this[$i]}" -v b="${bare[$i]}" 'BEGIN { printf "%.4f", k / b }')")
        done
        # shellcheck disable=SC2086
        target=0.90
        [[ "$base" == metered_memory ]] && target=0.80
        printf '%s %s: throughput %s/%s, median of %d rounds = %.2f (target >= %s); per round: %s; p50 %+.3f ms, p99 %+.3f ms (medians)\n' \
            "$method" "$path" "$mode" "$base" "${#ratios[@]}" "$(median "${ratios[@]}")" "$target" "${ratios[*]}" \
            "$(awk -v a="$(median ${P50[$mode.$name]})" -v b="$(median ${P50[$base.$name]})" 'BEGIN { print a - b }')" \
            "$(awk -v a="$(median ${P99[$mode.$name]})" -v b="$(median ${P99[$base.$name]})" 'BEGIN { print a - b }')"
    done
done

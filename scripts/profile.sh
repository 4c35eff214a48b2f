#!/usr/bin/env bash
# Instructions per request of the gateway, with and without keygate, by where they go.
#
# Runs the release gateway (`keygate serve`, embedded mock upstream) under callgrind twice:
# `--without-keygate` (the same server and proxy, no layer) and the full stack with a JSON
# Lines audit file. Each serves 300 warm-up requests uninstrumented, then N instrumented ones
# (a small chat completion over one keep-alive connection), and the script prints the
# instructions per request and the difference grouped by component. Instruction counts do not
# depend on what else the machine is doing, unlike timings. Loopback only; stops by itself.
#
#   scripts/profile.sh            # N=2000
#   N=500 scripts/profile.sh
#
# Needs valgrind (installed with apt-get when missing) and python3.
set -euo pipefail
N=${N:-2000}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if ! command -v valgrind >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
fi
echo "building keygate (release)..." >&2
cargo build --quiet --release -p keygate-cli --bin keygate
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
keygate_bin="$target_dir/release/keygate"
work=$(mktemp -d)
pid=""
cleanup() {
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

secret=$("$keygate_bin" --file "$work/keys.toml" --json keys create \
    --project load --create-project --name load --permissions all |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["secret"])')

# run NAME CONFIG [serve args]: leaves $work/NAME.out (callgrind's dump of the measured part).
run() {
    local name=$1 config=$2
    shift 2
    printf 'keys_file = "%s"\n%b\n' "$work/keys.toml" "$config" >"$work/$name.toml"
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/$name.cg" \
        "$keygate_bin" serve --listen 127.0.0.1:0 --config "$work/$name.toml" "$@" \
        >"$work/$name.stdout" 2>"$work/$name.stderr" &
    pid=$!
    local addr=""
    for _ in $(seq 1 600); do
        addr=$(sed -n 's/^keygate gateway listening on http:\/\///p' "$work/$name.stdout")
        [[ -n "$addr" ]] && break
        sleep 0.1
    done
    [[ -n "$addr" ]] || { cat "$work/$name.stderr" >&2; exit 1; }
    python3 - "$addr" "$secret" "$N" "$pid" <<'PY'
import http.client, subprocess, sys
addr, secret, n, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
host, port = addr.rsplit(":", 1)
conn = http.client.HTTPConnection(host, int(port), timeout=60)
body = '{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"Say hello to the load test."}]}'
headers = {"Authorization": "Bearer " + secret, "Content-Type": "application/json"}
def send(count):
    for _ in range(count):
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
send(300)
subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
send(n)
subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
PY
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    pid=""
    callgrind_annotate --threshold=100 "$work/$name.cg.1" 2>/dev/null >"$work/$name.out"
}

run bare "" --without-keygate
run keygate '[audit]\ntracing = false\n[audit.jsonl]\npath = "'"$work"'/audit.jsonl"'

python3 - "$work/bare.out" "$work/keygate.out" "$N" <<'PY'
import collections, re, sys
bare_file, kg_file, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def load(path):
    d = collections.Counter()
    for line in open(path):
        m = re.match(r"\s*([\d,]+)\s+\([\d. %]+\)\s+(.*)", line)
        if m and "PROGRAM TOTALS" not in line:
            name = re.sub(r" \[.*", "", m.group(2)).split(":", 1)[-1]
            d[name] += int(m.group(1).replace(",", ""))
    return d
groups = [
    ("audit record: JSON line (sink thread)", r"serde|format_escaped|time::format|itoa|ryu|jsonl|AuditEvent|Serialize"),
    ("extract: credential, checksum, SHA-256, key lookup", r"sha2|KeyFormat|key::|crc32|find_credential|keygate_extract|keygate_core::store|arc_swap"),
    ("scope: route, permissions, body read and model scan", r"keygate_scope"),
    ("rate and token limit layers", r"keygate_limit"),
    ("audit layer: request id, timers, metrics, event", r"keygate_audit|metrics|prometheus|RequestId|Timespec|clock"),
    ("allocation (malloc/free)", r"malloc|free|_int_|rdl_alloc|rust_alloc|consolidate|unlink_chunk"),
    ("memcpy", r"memcpy|memmove|memset"),
    ("headers and extensions (http crate, hash maps)", r"http::|HeaderMap|HeaderName|HeaderValue|hashbrown|Extensions"),
]
bare, kg = load(bare_file), load(kg_file)
by = collections.Counter()
for f in set(bare) | set(kg):
    v = (kg.get(f, 0) - bare.get(f, 0)) / n
    for label, pattern in groups:
        if re.search(pattern, f):
            by[label] += v
            break
    else:
        by["other"] += v
b_total, k_total = sum(bare.values()) / n, sum(kg.values()) / n
print(f"## Instructions per request (callgrind, {n} chat completions, mock upstream)\n")
print(f"bare (no keygate layer): {b_total:,.0f}; keygate (full stack, JSON Lines audit): {k_total:,.0f}; "
      f"added: {k_total - b_total:,.0f} ({(k_total - b_total) / b_total:.0%}); "
      f"instruction ratio bare/keygate = {b_total / k_total:.2f}\n")
print("| where the added instructions go | per request |")
print("| --- | --- |")
for label, v in by.most_common():
    print(f"| {label} | {v:,.0f} |")
PY

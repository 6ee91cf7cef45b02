#!/usr/bin/env bash
# The standard gRPC tools against the real gateway (`make test-probes`): grpc-health-probe checks grpc.health.v1
# (SERVING while running, NOT_SERVING once SIGTERM starts the graceful shutdown), and grpcurl lists the services
# through reflection (v1, which it asks for first, and v1alpha), calls grpc.health.v1.Health/List, and calls
# llmrelay.v1.LLMService/StreamComplete from JSON.
#
# The gateway (.venv/bin/llmrelay-server) runs in front of the fake OpenAI upstream (tests/upstream.py), both on
# loopback ports they pick themselves. The tools are the pinned ones of scripts/install_tools.sh (`make tools`).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLMRELAY_VENV:-$ROOT/.venv}"
PYTHON="$VENV/bin/python"
GOBIN_DIR="$(bash "$ROOT/scripts/install_tools.sh" --print-gobin)"
PROBE="$GOBIN_DIR/grpc-health-probe"
GRPCURL="$GOBIN_DIR/grpcurl"
for tool in "$PROBE" "$GRPCURL"; do
    [[ -x "$tool" ]] || { echo "probes: $tool is missing; run \`make tools\`" >&2; exit 1; }
done
[[ -x "$VENV/bin/llmrelay-server" ]] || { echo "probes: $VENV/bin/llmrelay-server is missing; run \`make setup\`" >&2; exit 1; }

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null
    done
    wait 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

PASSED=0
FAILED=0
check() { # check NAME COMMAND...: runs the command, counts it, shows its output when it fails
    local name="$1"
    shift
    if "$@" >"$WORK/check.out" 2>&1; then
        PASSED=$((PASSED + 1))
        echo "ok - $name"
    else
        FAILED=$((FAILED + 1))
        echo "not ok - $name"
        sed 's/^/    /' "$WORK/check.out"
    fi
}

# wait_line FILE REGEX PID: prints the first group of the first matching line of FILE, once PID has written it.
wait_line() {
    local file="$1" regex="$2" pid="$3" i
    for ((i = 0; i < 600; i++)); do
        if [[ -f "$file" ]] && [[ "$(cat "$file")" =~ $regex ]]; then
            echo "${BASH_REMATCH[1]}"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "probes: no line matching '$regex' in $file:" >&2
    cat "$file" >&2
    return 1
}

start_upstream() { # sets UPSTREAM (http://127.0.0.1:PORT)
    # --ollama: the gateway's "ollama" backend probes /api/version, which only then answers.
    "$PYTHON" "$ROOT/tests/upstream.py" --listen 127.0.0.1:0 --ollama >"$WORK/upstream.log" 2>&1 &
    PIDS+=($!)
    UPSTREAM="$(wait_line "$WORK/upstream.log" 'upstream listening on (http://[^[:space:]]+)' $!)" || exit 1
}

start_gateway() { # start_gateway NAME BASE_URL [YAML]: sets GATEWAY (127.0.0.1:PORT) and GATEWAY_PID
    local name="$1" base_url="$2" i
    printf 'llm:\n  ollama: {base_url: "%s", model: "tiny"}\nrouter: {retry: {max_retries: 0}}\n%s\n' "$base_url" \
        "${3:-}" >"$WORK/$name.yaml"
    (
        # Only the test config decides the backends, as in the Go and TypeScript harnesses.
        cd "$WORK" && unset OLLAMA_HOST "${!LLMRELAY_@}" && OPENAI_API_KEY="" exec "$VENV/bin/llmrelay-server" \
            --listen 127.0.0.1:0 --config "$WORK/$name.yaml" 2>"$WORK/$name.log"
    ) &
    GATEWAY_PID=$!
    PIDS+=("$GATEWAY_PID")
    GATEWAY="$(wait_line "$WORK/$name.log" 'listening on (127\.0\.0\.1:[0-9]+)' "$GATEWAY_PID")" || exit 1
    # Ready: grpc.health.v1 answers SERVING.
    for ((i = 0; i < 100; i++)); do
        "$PROBE" -addr "$GATEWAY" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "probes: the gateway at $GATEWAY never answered SERVING" >&2
    cat "$WORK/$name.log" >&2
    exit 1
}

# stream_text FILE: the concatenated delta.content of grpcurl's JSON stream output.
stream_text() {
    "$PYTHON" - "$1" <<'EOF'
import json, sys

text, decoder, pos, out = open(sys.argv[1]).read(), json.JSONDecoder(), 0, []
while (pos := len(text) - len(text[pos:].lstrip())) < len(text):
    message, pos = decoder.raw_decode(text, pos)
    out.append(message.get("delta", {}).get("content", ""))
print("".join(out), end="")
EOF
}

control() { # control METHOD PATH [JSON]: the upstream's fault switches
    "$PYTHON" - "$UPSTREAM" "$@" <<'EOF'
import sys, urllib.request

base, method, path, body = sys.argv[1], sys.argv[2], sys.argv[3], (sys.argv[4:] or [None])[0]
request = urllib.request.Request(base + path, method=method, data=body and body.encode(),
                                 headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(request, timeout=10).read().decode())
EOF
}

request_count() { # how many chat requests the upstream has received
    control GET /_control/requests | "$PYTHON" -c 'import json, sys; print(len(json.load(sys.stdin)))'
}

expect_output() { # expect_output WANT COMMAND...: the command succeeds and its output contains WANT
    local want="$1" out
    shift
    out="$("$@" 2>&1)" || { echo "$out"; return 1; }
    grep -qF -- "$want" <<<"$out" || { echo "no '$want' in:"; echo "$out"; return 1; }
}

expect_exit() { # expect_exit CODE COMMAND...: the command exits with CODE
    local want="$1" code
    shift
    "$@"
    code=$?
    [[ $code -eq $want ]] || { echo "exit code $code, want $want"; return 1; }
}

start_upstream
start_gateway gateway "$UPSTREAM/v1"
echo "probes: gateway at $GATEWAY, upstream at $UPSTREAM"

# --- grpc-health-probe ---
check "grpc-health-probe: the server is SERVING" expect_output "status: SERVING" "$PROBE" -addr "$GATEWAY"
check "grpc-health-probe: llmrelay.v1.LLMService is SERVING" \
    expect_output "status: SERVING" "$PROBE" -addr "$GATEWAY" -service llmrelay.v1.LLMService

# --- grpcurl, through reflection ---
check "grpcurl list: llmrelay.v1.LLMService" expect_output "llmrelay.v1.LLMService" "$GRPCURL" -plaintext "$GATEWAY" list
check "grpcurl list: grpc.health.v1.Health" expect_output "grpc.health.v1.Health" "$GRPCURL" -plaintext "$GATEWAY" list
check "grpcurl describe: StreamComplete" expect_output "rpc StreamComplete" \
    "$GRPCURL" -plaintext "$GATEWAY" describe llmrelay.v1.LLMService
list_both_reflections() {
    "$GRPCURL" -plaintext "$GATEWAY" list >"$WORK/list.txt" 2>&1 || { cat "$WORK/list.txt"; return 1; }
    grep -qx 'grpc.reflection.v1.ServerReflection' "$WORK/list.txt" &&
        grep -qx 'grpc.reflection.v1alpha.ServerReflection' "$WORK/list.txt" || { cat "$WORK/list.txt"; return 1; }
}
check "grpcurl list: reflection v1 and v1alpha" list_both_reflections
check "grpcurl: grpc.health.v1.Health/List lists liveness and readiness" \
    expect_output '"llmrelay.v1.LLMService": {' "$GRPCURL" -plaintext "$GATEWAY" grpc.health.v1.Health/List

stream_from_json() {
    "$GRPCURL" -plaintext -d '{"messages": [{"role": "ROLE_USER", "content": "hello from grpcurl"}]}' \
        "$GATEWAY" llmrelay.v1.LLMService/StreamComplete >"$WORK/stream.json" || return 1
    local text
    text="$(stream_text "$WORK/stream.json")"
    [[ "$text" == "echo: hello from grpcurl" ]] || { echo "streamed '$text'"; cat "$WORK/stream.json"; return 1; }
    grep -q '"finishReason": "FINISH_REASON_STOP"\|"finish_reason": "FINISH_REASON_STOP"' "$WORK/stream.json" ||
        { echo "no finish reason in:"; cat "$WORK/stream.json"; return 1; }
}
check "grpcurl: StreamComplete from JSON streams the answer" stream_from_json

rate_limited_details() {
    control POST /_control/faults '[{"status": 429, "retry_after": 3}]' >/dev/null || return 1
    "$GRPCURL" -plaintext -format-error -d '{"messages": [{"role": "ROLE_USER", "content": "hi"}]}' \
        "$GATEWAY" llmrelay.v1.LLMService/Complete >"$WORK/error.json" 2>&1
    local code=$?
    cat "$WORK/error.json"
    [[ $code -ne 0 ]] && grep -q '"reason": "UPSTREAM_RATE_LIMITED"' "$WORK/error.json" &&
        grep -q '"@type": "type.googleapis.com/google.rpc.RetryInfo"' "$WORK/error.json"
}
check "grpcurl: a 429 upstream shows ErrorInfo and RetryInfo" rate_limited_details

# --- reflection v1: grpcurl asks for it first, and for v1alpha only where v1 is UNIMPLEMENTED. Behind keys that
# leave v1 open and not v1alpha, grpcurl lists and describes only if it went through v1. ---
NO_KEY="$(printf '%064d' 0)" # a key's SHA-256 that no key has: every call needs one, except the open services
start_gateway reflection_v1 "$UPSTREAM/v1" "auth: {keys: [{name: probe, sha256: \"$NO_KEY\"}], \
open_services: [grpc.health.v1.Health, grpc.reflection.v1.ServerReflection]}"
check "grpcurl list goes through reflection v1 (v1alpha needs a key here)" \
    expect_output "llmrelay.v1.LLMService" "$GRPCURL" -plaintext "$GATEWAY" list
check "grpcurl describe goes through reflection v1" expect_output "rpc Complete" \
    "$GRPCURL" -plaintext "$GATEWAY" describe llmrelay.v1.LLMService
v1alpha_needs_a_key() { # the control: v1alpha is really closed on this gateway
    local out
    out="$("$PYTHON" - "$GATEWAY" 2>&1 <<'EOF'
import sys

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    try:
        list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    except grpc.RpcError as error:
        print(error.code().name)
EOF
)"
    [[ "$out" == "UNAUTHENTICATED" ]] || { echo "v1alpha without a key: '$out'"; return 1; }
}
check "reflection v1alpha needs a key on that gateway" v1alpha_needs_a_key
kill -TERM "$GATEWAY_PID"
wait "$GATEWAY_PID" 2>/dev/null

# --- a gateway whose only backend is down: the process is SERVING, llmrelay.v1.LLMService is not ---
DEAD_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
start_gateway dead "http://127.0.0.1:$DEAD_PORT/v1"
check "grpc-health-probe: a gateway with no reachable backend is SERVING" \
    expect_output "status: SERVING" "$PROBE" -addr "$GATEWAY"
check "grpc-health-probe: its llmrelay.v1.LLMService is NOT_SERVING" \
    expect_exit 4 "$PROBE" -addr "$GATEWAY" -service llmrelay.v1.LLMService
kill -TERM "$GATEWAY_PID"
wait "$GATEWAY_PID" 2>/dev/null

# --- graceful shutdown: NOT_SERVING while a call in flight finishes ---
start_gateway draining "$UPSTREAM/v1"
control DELETE /_control/faults >/dev/null
control POST /_control/faults '[{"stall_s": 4}]' >/dev/null
before="$(request_count)"
"$GRPCURL" -plaintext -max-time 30 -d '{"messages": [{"role": "ROLE_USER", "content": "in flight"}]}' \
    "$GATEWAY" llmrelay.v1.LLMService/StreamComplete >"$WORK/inflight.json" 2>&1 &
INFLIGHT_PID=$!
PIDS+=("$INFLIGHT_PID")
for ((i = 0; i < 100; i++)); do # the call has reached the (stalling) upstream
    [[ "$(request_count)" -gt "$before" ]] && break
    sleep 0.1
done
kill -TERM "$GATEWAY_PID"
sleep 0.3
not_serving() { # grpc-health-probe exits 4 for an unhealthy status
    local out code
    out="$("$PROBE" -addr "$GATEWAY" -connect-timeout 2s -rpc-timeout 2s 2>&1)"
    code=$?
    echo "$out"
    [[ $code -eq 4 ]] && grep -q 'NOT_SERVING' <<<"$out"
}
check "grpc-health-probe: NOT_SERVING during the graceful shutdown" not_serving
in_flight_finishes() {
    wait "$INFLIGHT_PID" || { cat "$WORK/inflight.json"; return 1; }
    local text
    text="$(stream_text "$WORK/inflight.json")"
    [[ "$text" == "echo: in flight" ]] || { echo "streamed '$text'"; cat "$WORK/inflight.json"; return 1; }
}
check "the call in flight finishes within the grace period" in_flight_finishes
gateway_exit() {
    wait "$GATEWAY_PID"
    local code=$?
    [[ $code -eq 0 ]] || { echo "exit code $code"; cat "$WORK/draining.log"; return 1; }
}
check "the gateway exits 0 after SIGTERM" gateway_exit

echo "probes: $PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]

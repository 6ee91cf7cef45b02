#!/usr/bin/env bash
# Check the Go module as a user gets it (`make test-go-module`): a new module in a folder outside the repo requires
# github.com/llmrelay/llmrelay/client/go through client/go/README.md's recipe (a replace directive to a checkout,
# until the module is published), builds a small program with it, and runs that program against a real gateway
# (tests/harness.py), with the default dial options: plaintext to a loopback target, the retrying service config.
#
# Dependencies come from the Go proxy (or Go's module cache), as for a user; nothing of the repo's own go.mod or
# go.work is used. Fails, saying where, when the recipe, the build or the call fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${LLMRELAY_VENV:-$ROOT/.venv}/bin/python"
MODULE=github.com/llmrelay/llmrelay/client/go
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llmrelay-go-module-XXXXXX")"
HARNESS_PID=""
NL=$'\n'

cleanup() {
    if [[ -n "$HARNESS_PID" ]]; then
        eval "exec ${HARNESS[1]}>&-" 2>/dev/null || true # the end of its stdin stops the harness and its gateway
        wait "$HARNESS_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

fail() {
    echo "check_go_module: $*" >&2
    exit 1
}

[[ -x "$PYTHON" ]] || fail "$PYTHON is missing: run \`make setup\` at the repo root"
case "$WORK" in "$ROOT"/*) fail "the scratch folder $WORK is inside the repo; set TMPDIR elsewhere" ;; esac

# The recipe of client/go/README.md ("Use it"), step by step, in a module of its own.
mkdir "$WORK/app"
cd "$WORK/app"
export GOWORK=off GOFLAGS=-mod=mod
go mod init example.com/llmrelay-module-check >/dev/null 2>&1
go mod edit -replace "$MODULE=$ROOT/client/go"
cat >main.go <<'EOF'
// A user's first program: one streamed answer, printed as it comes, and a tool the model may call.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/llmrelay/llmrelay/client/go/llmrelay"
	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

type noArgs struct{}

func main() {
	client, err := llmrelay.Dial(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer client.Close()
	tool, err := llmrelay.NewTool("ping", "Answers pong", func(context.Context, noArgs) (string, error) { return "pong", nil })
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	agent := &llmrelay.Agent{Client: client, Tools: []llmrelay.Tool{tool}, OnChunk: llmrelay.PrintTo(os.Stdout)}
	result, err := agent.Run(ctx, llmrelay.NewConversation(llmrelay.User("hello from a module outside the repo")))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if result.Answer.GetFinishReason() != llmrelayv1.FinishReason_FINISH_REASON_STOP {
		fmt.Fprintln(os.Stderr, "finish reason", result.Answer.GetFinishReason())
		os.Exit(1)
	}
	fmt.Println()
}
EOF
go mod tidy >"$WORK/tidy.log" 2>&1 || fail "go mod tidy with the replace directive failed:${NL}$(cat "$WORK/tidy.log")"
replaced="$(go list -m -f '{{with .Replace}}{{.Path}}{{end}}' "$MODULE")"
[[ "$replaced" == "$ROOT/client/go" ]] || fail "$MODULE resolves to \"$replaced\", not the checkout; go.mod:${NL}$(cat go.mod)"
go build -o "$WORK/check" . || fail "the program does not build against $ROOT/client/go"

# A real gateway in front of the loopback upstream; its JSON line says where.
coproc HARNESS { exec "$PYTHON" "$ROOT/tests/harness.py" 2>"$WORK/harness.log"; }
HARNESS_PID=$!
IFS= read -r -t 90 where <&"${HARNESS[0]}" ||
    fail "the harness did not start a gateway within 90 s:${NL}$(cat "$WORK/harness.log")"
target="$(printf '%s' "$where" | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["target"])')"

answer="$("$WORK/check" "$target")" ||
    fail "the program failed against the gateway at $target:${NL}$answer${NL}$(tail -n 20 "$WORK/harness.log")"
[[ "$answer" == "echo: hello from a module outside the repo" ]] ||
    fail "the program printed \"$answer\", want the upstream's echo"
echo "check_go_module: a module outside the repo built with $MODULE (replace => $ROOT/client/go) and called the gateway"

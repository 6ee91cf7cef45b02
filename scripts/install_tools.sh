#!/usr/bin/env bash
# Install the pinned tools of the Go and TypeScript clients (the one way to do it: `make tools`).
#
# Usage: install_tools.sh [--print-gobin]
#
# Go tools (the protoc plugins, grpc-health-probe, grpcurl) are installed with `go install` at pinned versions into
# a cache outside the repo, keyed by those versions, so a changed pin installs afresh and an unchanged one costs
# nothing. The node dependencies of client/node are installed by `npm ci` from the committed lockfile, again only
# when the lockfile changed since the last install. Go's and npm's download caches stay where they are by default
# (under ~), so a warm machine installs from them without the network.
#
# With --print-gobin, only prints the folder the Go tools go to (for gen_protos.py and the tests), installing nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_DIR="$ROOT/client/node"

# Pinned so that every machine generates the same bytes and probes with the same tools.
# protoc-gen-go's version must not be newer than google.golang.org/protobuf in client/go/go.mod.
GO_TOOLS=(
    google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
    google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
    github.com/grpc-ecosystem/grpc-health-probe@v0.4.61
    github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4
)

CACHE_DIR="${LLMRELAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmrelay}"
GO_TOOLS_KEY="$(printf '%s\n' "${GO_TOOLS[@]}" | sha256sum | cut -c1-12)"
GOBIN_DIR="$CACHE_DIR/go-tools-$GO_TOOLS_KEY/bin"

if [[ "${1:-}" == "--print-gobin" ]]; then
    echo "$GOBIN_DIR"
    exit 0
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--print-gobin]" >&2
    exit 2
fi

need() {
    command -v "$1" >/dev/null || { echo "install_tools: $1 is not installed ($2)" >&2; exit 1; }
}
need go "Go 1.24 or newer"
need node "Node.js 20 or newer"
need npm "npm, with Node.js"

install_go_tools() {
    mkdir -p "$GOBIN_DIR"
    local tool pkg name
    for tool in "${GO_TOOLS[@]}"; do
        pkg="${tool%@*}"
        name="${pkg##*/}"
        if [[ -x "$GOBIN_DIR/$name" ]]; then
            continue
        fi
        echo "install_tools: go install $tool"
        # The tools' own go.mod files choose their dependencies; the Go toolchain already here builds them.
        GOBIN="$GOBIN_DIR" GOTOOLCHAIN=local go install "$tool"
    done
}

install_node_deps() {
    local stamp="$NODE_DIR/node_modules/.llmrelay-lock.sha256"
    local want
    want="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    echo "install_tools: npm ci in client/node"
    (cd "$NODE_DIR" && npm ci --prefer-offline --no-audit --no-fund --loglevel=error)
    echo "$want" >"$stamp"
}

install_go_tools
install_node_deps
echo "install_tools: Go tools in $GOBIN_DIR; node deps in client/node/node_modules"

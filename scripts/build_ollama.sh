#!/usr/bin/env bash
# Build (or reuse) an Ollama binary for the integration tests and print its path.
#
# No registry ships Ollama itself, but its Go module is on the Go module proxy and
# cgo compiles the bundled llama.cpp/ggml CPU backend, so a plain `go build` gives a
# CPU-only server. CMake is only needed for GPU libraries, which the tests don't use.
#
# Usage: scripts/build_ollama.sh            # prints the binary path on stdout
#        OLLAMA_VERSION=v0.17.4 scripts/build_ollama.sh
# Progress goes to stderr so callers can do: OLLAMA_BIN="$(scripts/build_ollama.sh)".
set -euo pipefail

OLLAMA_VERSION="${OLLAMA_VERSION:-v0.17.4}"
CACHE_ROOT="${LLMRELAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmrelay}"
OUT_DIR="$CACHE_ROOT/ollama-$OLLAMA_VERSION"
OUT_BIN="$OUT_DIR/ollama"

die() {
    echo "build_ollama.sh: $*" >&2
    exit 1
}

if [[ -x "$OUT_BIN" ]]; then
    echo "$OUT_BIN"
    exit 0
fi

command -v go >/dev/null || die "Go toolchain not found on PATH (need go >= 1.24 to build Ollama $OLLAMA_VERSION)"
command -v gcc >/dev/null || die "gcc not found: cgo needs a C compiler to build Ollama's ggml backend"
command -v g++ >/dev/null || die "g++ not found: cgo needs a C++ compiler to build Ollama's ggml backend"

# Go module zips leave out every vendor/ directory, so the copy of llama.cpp inside the
# Ollama module arrives without llama.cpp/vendor/{nlohmann,stb,miniaudio}. Debian
# packages the first two under /usr/include (on the compiler's default path); miniaudio
# only decodes audio input, which the tests never send, so a stub stands in for it.
headers_present() {
    local header
    for header in nlohmann/json.hpp nlohmann/json_fwd.hpp stb/stb_image.h; do
        echo "#include <$header>" | g++ -std=c++17 -fsyntax-only -x c++ - 2>/dev/null || return 1
    done
}
if ! headers_present && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "build_ollama.sh: installing the C++ headers llama.cpp vendors (nlohmann-json3-dev, libstb-dev)" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nlohmann-json3-dev libstb-dev >&2
fi
headers_present || die "C++ headers nlohmann/json.hpp or stb/stb_image.h not found: install them with 'apt-get install -y nlohmann-json3-dev libstb-dev'"

WORK_DIR="$(mktemp -d)"
trap 'chmod -R u+w "$WORK_DIR" 2>/dev/null; rm -rf "$WORK_DIR"' EXIT

MODULE="github.com/ollama/ollama@$OLLAMA_VERSION"
echo "build_ollama.sh: downloading $MODULE from the Go module proxy" >&2
# From an empty directory, so a go.mod around the caller's working directory plays no part.
MOD_DIR="$(cd "$WORK_DIR" && go mod download -json "$MODULE" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[[ -n "$MOD_DIR" && -d "$MOD_DIR" ]] || die "go mod download $MODULE gave no source directory"

# The module cache is read-only, so the build needs a writable copy to add the stub below.
cp -r "$MOD_DIR/." "$WORK_DIR/src"
chmod -R u+w "$WORK_DIR/src"

MINIAUDIO_DIR="$WORK_DIR/src/llama/llama.cpp/vendor/miniaudio"
mkdir -p "$MINIAUDIO_DIR"
cat >"$MINIAUDIO_DIR/miniaudio.h" <<'STUB'
/* Stand-in for miniaudio, written by llmrelay's scripts/build_ollama.sh: only
 * mtmd-helper.cpp includes it, to decode audio attachments. Every decode fails, so
 * audio input is rejected as undecodable; text and images are unaffected. */
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef int ma_result;
typedef uint32_t ma_uint32;
typedef uint64_t ma_uint64;
typedef enum { ma_format_f32 = 5 } ma_format;
typedef struct { ma_format format; ma_uint32 channels; ma_uint32 sampleRate; } ma_decoder_config;
typedef struct { int unused; } ma_decoder;

#define MA_SUCCESS 0
#define MA_NOT_IMPLEMENTED (-29)

static inline ma_decoder_config ma_decoder_config_init(ma_format format, ma_uint32 channels, ma_uint32 rate) {
    ma_decoder_config config = {format, channels, rate};
    return config;
}
static inline ma_result ma_decoder_init_memory(const void *, size_t, const ma_decoder_config *, ma_decoder *) {
    return MA_NOT_IMPLEMENTED;
}
static inline ma_result ma_decoder_get_length_in_pcm_frames(ma_decoder *, ma_uint64 *) { return MA_NOT_IMPLEMENTED; }
static inline ma_result ma_decoder_read_pcm_frames(ma_decoder *, void *, ma_uint64, ma_uint64 *) {
    return MA_NOT_IMPLEMENTED;
}
static inline ma_result ma_decoder_uninit(ma_decoder *) { return MA_SUCCESS; }
STUB

echo "build_ollama.sh: compiling Ollama $OLLAMA_VERSION (cgo builds ggml; several minutes on 2 cores)" >&2
start=$SECONDS
(
    cd "$WORK_DIR/src"
    # Without the version stamp `ollama --version` and /api/version report 0.0.0.
    CGO_ENABLED=1 GOFLAGS=-mod=mod go build -trimpath \
        -ldflags "-s -w -X github.com/ollama/ollama/version.Version=${OLLAMA_VERSION#v}" \
        -o "$WORK_DIR/ollama" .
) >&2 || die "go build of Ollama $OLLAMA_VERSION failed (see the compiler output above)"

mkdir -p "$OUT_DIR"
# Rename within the target dir so a concurrent reader never sees a partial binary.
cp "$WORK_DIR/ollama" "$OUT_BIN.tmp.$$"
mv "$OUT_BIN.tmp.$$" "$OUT_BIN"
echo "build_ollama.sh: built $OUT_BIN in $((SECONDS - start)) s ($(du -h "$OUT_BIN" | cut -f1))" >&2
echo "$OUT_BIN"

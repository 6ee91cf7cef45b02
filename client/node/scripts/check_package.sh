#!/usr/bin/env bash
# Checks the npm package as a user gets it: `npm pack` (which builds it), the tarball's contents, then an empty
# project outside the repo that installs the tarball (its dependencies from the npm registry) and calls a real
# gateway (tests/harness.py) from plain JavaScript through require (CJS) and import (ESM), and from TypeScript
# compiled by tsc for Node's ESM and CJS (moduleResolution node16) and type-checked for bundlers (bundler).
#
#   bash client/node/scripts/check_package.sh      (make test-node-package; needs `make setup` and `make tools`)
set -euo pipefail

NODE_DIR="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="$(cd "$NODE_DIR/../.." && pwd)"
PYTHON="${LLMRELAY_VENV:-$ROOT/.venv}/bin/python"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llmrelay-npm-package.XXXXXX")"
HARNESS_PID=""

fail() {
    echo "check_package: $*" >&2
    exit 1
}

cleanup() {
    if [[ -n "$HARNESS_PID" ]]; then
        exec {HARNESS[1]}>&- 2>/dev/null || true # the harness stops its gateway when its stdin ends
        wait "$HARNESS_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

[[ -x "$PYTHON" ]] || fail "$PYTHON is missing; run \`make setup\` at the repo root"
[[ -d "$NODE_DIR/node_modules" ]] || fail "client/node has no node_modules; run \`make tools\`"
case "$WORK" in "$ROOT"/*) fail "the project must be outside the repo, and $WORK is inside it" ;; esac

echo "check_package: npm pack (builds dist/)"
TARBALL="$WORK/$(cd "$NODE_DIR" && npm pack --silent --pack-destination "$WORK" | tail -n 1)"
[[ -f "$TARBALL" ]] || fail "npm pack made no tarball in $WORK"

# What the tarball holds: both builds with their types and package.json markers; no sources, no source maps.
CONTENTS="$(tar -tzf "$TARBALL")"
for path in dist/cjs/index.js dist/cjs/index.d.ts dist/cjs/package.json dist/esm/index.js dist/esm/index.d.ts \
    dist/esm/package.json package.json README.md; do
    grep -qx "package/$path" <<<"$CONTENTS" || fail "the tarball lacks $path; it holds:
$CONTENTS"
done
if grep -E '\.map$|^package/(src|test|examples|scripts)/' <<<"$CONTENTS"; then
    fail "the tarball ships the files above, which users should not get"
fi

PROJECT="$WORK/project"
mkdir "$PROJECT"
cd "$PROJECT"
echo '{ "name": "llmrelay-package-check", "version": "1.0.0", "private": true }' >package.json
# The same TypeScript and Node types the package is built with.
typescript="typescript@$(node -p "require('$NODE_DIR/package.json').devDependencies.typescript")"
node_types="@types/node@$(node -p "require('$NODE_DIR/package.json').devDependencies['@types/node']")"
echo "check_package: npm install the tarball, $typescript and $node_types into $PROJECT"
npm install --silent --no-audit --no-fund "$TARBALL" "$typescript" "$node_types"

echo "check_package: starting a gateway (tests/harness.py)"
coproc HARNESS { "$PYTHON" "$ROOT/tests/harness.py" 2>"$WORK/harness.log"; }
HARNESS_PID=$!
read -r -t 90 WHERE <&"${HARNESS[0]}" || fail "the harness said nothing within 90 s:
$(cat "$WORK/harness.log")"
TARGET="$(node -p 'JSON.parse(process.argv[1]).target' "$WHERE")"
export LLMRELAY_TARGET="$TARGET"

# Each program calls the gateway, checks the answer, the error class and the re-exported status codes, and says
# which build it loaded.
cat >check.cjs <<'EOF'
const assert = require("node:assert/strict");
const { Client, LLMRelayError, Metadata, status, user } = require("@llmrelay/client");

(async () => {
  assert.match(require.resolve("@llmrelay/client"), /dist[\\/]cjs[\\/]index\.js$/);
  const client = new Client(process.env.LLMRELAY_TARGET);
  try {
    const answer = await client.complete({ messages: [user("from CommonJS")] });
    assert.equal(answer.message.content, "echo: from CommonJS");
    const err = await client.complete({ messages: [] }).catch((e) => e);
    assert.ok(err instanceof LLMRelayError, String(err));
    assert.equal(err.code, status.INVALID_ARGUMENT);
    assert.ok(err.metadata instanceof Metadata);
  } finally {
    client.close();
  }
  console.log("require (CJS): ok");
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
EOF

cat >check.mjs <<'EOF'
import assert from "node:assert/strict";
import { Client, LLMRelayError, status, user } from "@llmrelay/client";

assert.match(import.meta.resolve("@llmrelay/client"), /dist\/esm\/index\.js$/);
const client = new Client(process.env.LLMRELAY_TARGET);
try {
  const answer = await client.complete({ messages: [user("from an ES module")] });
  assert.equal(answer.message.content, "echo: from an ES module");
  const err = await client.complete({ messages: [] }).catch((e) => e);
  assert.ok(err instanceof LLMRelayError, String(err));
  assert.equal(err.code, status.INVALID_ARGUMENT);
} finally {
  client.close();
}
console.log("import (ESM): ok");
EOF

# One TypeScript source, compiled as an ES module (.mts) and as CommonJS (.cts): each resolves its own types.
typescript_check() {
    cat <<EOF
import assert from "node:assert/strict";
import { Client, LLMRelayError, s, status, tool, user, type CompleteResponse, type Infer } from "@llmrelay/client";

const weather = s.object({ city: s.string(), unit: s.enum(["celsius", "fahrenheit"]).optional() });
const args: Infer<typeof weather> = { city: "Lisbon" };
const getWeather = tool({ name: "get_weather", parameters: weather, run: ({ city }) => city.toUpperCase() });

async function main(): Promise<void> {
  const client = new Client(process.env.LLMRELAY_TARGET);
  try {
    const answer: CompleteResponse = await client.complete({ messages: [user("from TypeScript ($1)")] });
    assert.equal(answer.message?.content, "echo: from TypeScript ($1)");
    const err: unknown = await client.complete({ messages: [] }).catch((e: unknown) => e);
    assert.ok(err instanceof LLMRelayError);
    assert.equal(err.code, status.INVALID_ARGUMENT);
    assert.equal(getWeather.name, args.city === "Lisbon" ? "get_weather" : "");
  } finally {
    client.close();
  }
  console.log("TypeScript ($1): ok");
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
EOF
}
typescript_check "ESM, node16" >check_ts.mts
typescript_check "CJS, node16" >check_ts.cts
cat >tsconfig.json <<'EOF'
{
  "compilerOptions": {
    "target": "ES2022",
    "module": "node16",
    "moduleResolution": "node16",
    "strict": true,
    "types": ["node"],
    "outDir": "out"
  },
  "files": ["check_ts.mts", "check_ts.cts"]
}
EOF
cat >tsconfig.bundler.json <<'EOF'
{
  "extends": "./tsconfig.json",
  "compilerOptions": { "module": "esnext", "moduleResolution": "bundler", "noEmit": true },
  "files": ["check_ts.mts"]
}
EOF

echo "check_package: calling $TARGET"
node check.cjs
node check.mjs
npx --no-install tsc -p tsconfig.json
npx --no-install tsc -p tsconfig.bundler.json
echo "TypeScript (bundler): types ok"
node out/check_ts.mjs
node out/check_ts.cjs
echo "check_package: OK"

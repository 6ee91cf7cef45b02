// Builds the package into dist/: CommonJS in dist/cjs (for require) and ES modules in dist/esm (for import), each
// with its declarations and a package.json that tells Node which it is. `npm run build` and `npm pack` run it.
//
// ES modules need the file extension in relative imports ("./client.js"), which the generated stubs and this
// package's sources leave out (as CommonJS allows): this script adds it to the ESM output, and fails on an import
// it cannot resolve to a file.
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(root, "dist");
const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");

rmSync(dist, { recursive: true, force: true });
for (const [config, type] of [
  ["tsconfig.cjs.json", "commonjs"],
  ["tsconfig.esm.json", "module"],
]) {
  execFileSync(process.execPath, [tsc, "-p", join(root, config)], { stdio: "inherit" });
  const out = join(dist, type === "module" ? "esm" : "cjs");
  writeFileSync(join(out, "package.json"), `${JSON.stringify({ type }, null, 2)}\n`);
}

// `from "./x"`, `import "./x"`, `import("./x")`: a relative specifier in quotes.
const RELATIVE_IMPORT = /(\bfrom\s*|\bimport\s*\(?\s*)(["'])(\.\.?\/[^"']*)\2/g;

/** The specifier with its extension: "./x" → "./x.js", or "./dir" → "./dir/index.js". */
function withExtension(file, specifier) {
  if (/\.(c|m)?js$/.test(specifier)) {
    return specifier;
  }
  for (const candidate of [`${specifier}.js`, `${specifier}/index.js`]) {
    if (existsSync(join(dirname(file), candidate))) {
      return candidate;
    }
  }
  throw new Error(`build: ${file} imports ${specifier}, which is no file of the ESM output`);
}

function* outputFiles(dir) {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) {
      yield* outputFiles(path);
    } else if (/\.(js|d\.ts)$/.test(entry.name)) {
      yield path;
    }
  }
}

for (const file of outputFiles(join(dist, "esm"))) {
  const text = readFileSync(file, "utf8");
  const fixed = text.replace(
    RELATIVE_IMPORT,
    (_, keyword, quote, specifier) => `${keyword}${quote}${withExtension(file, specifier)}${quote}`,
  );
  if (fixed !== text) {
    writeFileSync(file, fixed);
  }
}

/**
 * Runs the real llmrelay gateway in front of the repo's fake OpenAI upstream (tests/upstream.py), both as
 * subprocesses on loopback, for the end-to-end tests. Needs the repo's Python environment (`make setup`).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";

import { Client } from "../src";

/** How long a subprocess may take to say it is listening. */
export const START_TIMEOUT_MS = 60_000;
/** The embedding model of the gateway's "ollama" backend (the fake upstream's). */
export const EMBEDDING_MODEL = "embed-test";

export function repoRoot(): string {
  let dir = __dirname;
  for (;;) {
    if (existsSync(join(dir, "proto", "llmrelay", "v1", "llmrelay.proto"))) {
      return dir;
    }
    const parent = dirname(dir);
    if (parent === dir) {
      throw new Error("not inside the llmrelay repo (no proto/llmrelay/v1/llmrelay.proto above)");
    }
    dir = parent;
  }
}

function venvBin(name: string): string {
  const venv = process.env.LLMRELAY_VENV ?? join(repoRoot(), ".venv");
  const path = join(venv, "bin", name);
  if (!existsSync(path)) {
    throw new Error(`${path} is missing; run \`make setup\` at the repo root`);
  }
  return path;
}

const running = new Set<ChildProcess>();
process.on("exit", () => {
  for (const child of running) {
    child.kill("SIGKILL");
  }
});

/** A subprocess whose output is kept for the messages of failed tests. */
class Proc {
  readonly output: string[] = [];
  readonly exited: Promise<number | null>;

  constructor(
    readonly name: string,
    readonly child: ChildProcess,
  ) {
    running.add(child);
    this.exited = new Promise((resolve) => {
      child.on("exit", (code, signal) => {
        running.delete(child);
        resolve(signal ? null : code);
      });
    });
  }

  /** Waits for a line of the stream that matches; returns the pattern's first group. */
  waitFor(stream: NodeJS.ReadableStream, pattern: RegExp): Promise<string> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.child.kill("SIGKILL");
        reject(new Error(`${this.name} was not ready within ${START_TIMEOUT_MS} ms:\n${this.log()}`));
      }, START_TIMEOUT_MS);
      let found = false;
      createInterface({ input: stream }).on("line", (line) => {
        this.output.push(line);
        const match = pattern.exec(line);
        if (match && !found) {
          found = true;
          clearTimeout(timer);
          resolve(match[1]!);
        }
      });
      void this.exited.then((code) => {
        clearTimeout(timer);
        if (!found) {
          reject(new Error(`${this.name} exited (${code}) before it was ready:\n${this.log()}`));
        }
      });
    });
  }

  log(): string {
    return this.output.join("\n");
  }

  /**
   * SIGTERM (a no-op once it has exited), then SIGKILL after timeoutMs; resolves to the exit code (null when killed
   * by a signal).
   */
  async stop(timeoutMs = 15_000): Promise<number | null> {
    this.child.kill("SIGTERM");
    const timer = setTimeout(() => this.child.kill("SIGKILL"), timeoutMs);
    const code = await this.exited;
    clearTimeout(timer);
    return code;
  }
}

/** One fault of the upstream: {status: 429, retry_after: 3}, {stall_s: 5}, {drop: true}, ... */
export type Fault = Record<string, unknown>;

/** The fake OpenAI-compatible upstream, also serving Ollama's probe endpoints. */
export class Upstream {
  private constructor(
    /** Its base, "http://127.0.0.1:PORT". */
    readonly url: string,
    private readonly proc: Proc,
  ) {}

  static async start(): Promise<Upstream> {
    const script = join(repoRoot(), "tests", "upstream.py");
    // --ollama: the gateway's "ollama" backend probes /api/version, which only then answers.
    const child = spawn(venvBin("python"), [script, "--listen", "127.0.0.1:0", "--ollama"], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    const proc = new Proc("upstream", child);
    const url = await proc.waitFor(child.stdout!, /upstream listening on (http:\/\/\S+)/);
    return new Upstream(url, proc);
  }

  /** Queues faults: each later chat request takes the next one. */
  addFaults(...faults: Fault[]): Promise<void> {
    return this.faults("POST", faults);
  }

  clearFaults(): Promise<void> {
    return this.faults("DELETE");
  }

  /**
   * The chat request bodies received so far, oldest first, as the JSON text of a list: numbers read as the upstream
   * read them (JSON.parse would make 3.0 and 3 alike).
   */
  async requests(): Promise<string> {
    const response = await fetch(`${this.url}/_control/requests`, { signal: AbortSignal.timeout(10_000) });
    return response.text();
  }

  async stop(): Promise<void> {
    await this.proc.stop(5_000);
  }

  /** Calls the upstream's fault queue, /_control/faults. */
  private async faults(method: string, body?: Fault[]): Promise<void> {
    const path = "/_control/faults";
    const response = await fetch(this.url + path, {
      method,
      headers: { "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(10_000),
    });
    const text = await response.text();
    if (!response.ok) {
      throw new Error(`${method} ${path}: HTTP ${response.status}: ${text}`);
    }
  }
}

export interface GatewayOptions {
  /**
   * A second backend, "fallback" (kind openai_compatible, model "tiny"), at this base URL: after "ollama" in the
   * routing order, so that it takes over what "ollama" fails.
   */
  fallbackUrl?: string;
}

/**
 * The real gateway (.venv/bin/llmrelay-server) with one "ollama" backend at baseUrl (and a "fallback" one when
 * options.fallbackUrl is set), no retries.
 */
export class Gateway {
  private constructor(
    /** Where it serves gRPC, "127.0.0.1:PORT". */
    readonly addr: string,
    private readonly proc: Proc,
    /** Its config and usage ledger, removed by stop(). */
    private readonly dir: string,
  ) {}

  static async start(baseUrl: string, options: GatewayOptions = {}): Promise<Gateway> {
    const dir = mkdtempSync(join(tmpdir(), "llmrelay-gateway-"));
    const config = join(dir, "config.yaml");
    const ollama = `{base_url: ${JSON.stringify(baseUrl)}, model: "tiny", embedding_model: ${EMBEDDING_MODEL}}`;
    const lines = ["llm:", `  ollama: ${ollama}`];
    if (options.fallbackUrl) {
      const url = JSON.stringify(options.fallbackUrl);
      lines.push("  backends:", `    - {name: fallback, kind: openai_compatible, base_url: ${url}, model: "tiny"}`);
    }
    lines.push("router: {retry: {max_retries: 0}}", "");
    writeFileSync(config, lines.join("\n"));
    const env: NodeJS.ProcessEnv = { ...process.env, OPENAI_API_KEY: "" };
    delete env.OLLAMA_HOST;
    for (const key of Object.keys(env).filter((k) => k.startsWith("LLMRELAY_"))) {
      delete env[key];
    }
    const child = spawn(venvBin("llmrelay-server"), ["--listen", "127.0.0.1:0", "--config", config], {
      cwd: dir,
      env,
      stdio: ["ignore", "inherit", "pipe"],
    });
    const proc = new Proc("gateway", child);
    try {
      const gateway = new Gateway(await proc.waitFor(child.stderr!, /listening on (127\.0\.0\.1:\d+)/), proc, dir);
      await gateway.waitServing();
      return gateway;
    } catch (err) {
      await proc.stop(5_000);
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /** Waits until a call goes through: the gateway answers, and handles SIGTERM. */
  private async waitServing(): Promise<void> {
    const client = new Client(this.addr, { insecure: true, timeoutMs: 2_000 });
    const deadline = Date.now() + START_TIMEOUT_MS;
    try {
      for (;;) {
        try {
          await client.health();
          return;
        } catch (err) {
          if (Date.now() > deadline) {
            throw new Error(`the gateway at ${this.addr} does not answer (${String(err)}):\n${this.log()}`);
          }
          await new Promise((resolve) => setTimeout(resolve, 100));
        }
      }
    } finally {
      client.close();
    }
  }

  /** SIGTERM, then removes its directory; resolves to the exit code (null when killed by a signal). */
  async stop(timeoutMs = 15_000): Promise<number | null> {
    const code = await this.proc.stop(timeoutMs);
    rmSync(this.dir, { recursive: true, force: true });
    return code;
  }

  log(): string {
    return this.proc.log();
  }
}

/** A loopback address where nothing listens (a port that was free a moment ago). */
export function deadAddr(): Promise<string> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => {
        if (address === null || typeof address === "string") {
          reject(new Error("no port"));
        } else {
          resolve(`127.0.0.1:${address.port}`);
        }
      });
    });
  });
}

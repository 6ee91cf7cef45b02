/**
 * The end-to-end tests' gateway: the repo's shared harness (tests/harness.py) started as a subprocess, which runs the
 * real gateway in front of the loopback fake upstream (tests/upstream.py). Needs the repo's Python environment
 * (`make setup`).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";

/** How long the harness may take to say where its gateway serves. */
export const START_TIMEOUT_MS = 90_000;
/** How long the harness may take to stop its gateway and upstream once asked to. */
const STOP_TIMEOUT_MS = 20_000;

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

function venvPython(): string {
  const venv = process.env.LLMRELAY_VENV ?? join(repoRoot(), ".venv");
  const path = join(venv, "bin", "python");
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

/** One fault of the upstream: {status: 429, retry_after: 3}, {stall_s: 5}, {tool_calls: [...]}, ... */
export type Fault = Record<string, unknown>;

/** The fake upstream's control API. */
export class Upstream {
  constructor(
    /** Its base, "http://127.0.0.1:PORT". */
    readonly url: string,
  ) {}

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

  /** How many chat requests it has received. */
  async requestCount(): Promise<number> {
    return (JSON.parse(await this.requests()) as unknown[]).length;
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
  /** A second backend, "fallback", after "ollama" in the routing order, on the same upstream. */
  fallback?: boolean;
  /** Serve TLS with a certificate for localhost and 127.0.0.1 from a CA made for the run (caFile). */
  tls?: boolean;
  /**
   * Serve TLS so, and ask every client for a certificate of a second CA made for the run: clientCertificate is one,
   * otherClientCertificate one of a third CA, which the gateway refuses.
   */
  mutualTls?: boolean;
  /** The router's max_retries (default 0). */
  retries?: number;
  /** The gateway's server.max_message_bytes (default: the gateway's own). */
  maxMessageBytes?: number;
  /**
   * YAML appended to the gateway's configuration (the harness's --config-extra): sections the harness does not write,
   * such as auth with caller keys and their limits; never its own server, llm or router.
   */
  configExtra?: string;
}

/** What the harness prints once its gateway serves. */
interface Where {
  target: string;
  upstream: string;
  fallback_backend: string | null;
  embedding_model: string;
  ca_file: string | null;
  client_cert_file: string | null;
  client_key_file: string | null;
  other_client_cert_file: string | null;
  other_client_key_file: string | null;
  gateway_pid: number;
}

/** A client certificate and its private key, in PEM. */
export interface Issued {
  cert: Buffer;
  key: Buffer;
}

/** A gateway with its own fake upstream, both started by tests/harness.py. */
export class Gateway {
  private constructor(
    private readonly child: ChildProcess,
    private readonly output: string[],
    private readonly exited: Promise<number | null>,
    private readonly where: Where,
    readonly upstream: Upstream,
  ) {}

  static async start(options: GatewayOptions = {}): Promise<Gateway> {
    const args = [join(repoRoot(), "tests", "harness.py")];
    if (options.fallback) args.push("--fallback");
    if (options.mutualTls) args.push("--mutual-tls");
    else if (options.tls) args.push("--tls");
    if (options.retries !== undefined) args.push("--retries", String(options.retries));
    if (options.maxMessageBytes !== undefined) args.push("--max-message-bytes", String(options.maxMessageBytes));
    // The harness reads the file before it starts anything, so it can go once start() returns.
    let scratch: string | undefined;
    try {
      if (options.configExtra !== undefined) {
        scratch = mkdtempSync(join(tmpdir(), "llmrelay-harness-"));
        const path = join(scratch, "config-extra.yaml");
        writeFileSync(path, options.configExtra);
        args.push("--config-extra", path);
      }
      return await Gateway.spawn(args);
    } finally {
      if (scratch !== undefined) rmSync(scratch, { recursive: true, force: true });
    }
  }

  private static async spawn(args: string[]): Promise<Gateway> {
    // stdin a pipe: closing it stops the harness.
    const child = spawn(venvPython(), args, { stdio: ["pipe", "pipe", "pipe"] });
    running.add(child);
    const output: string[] = [];
    createInterface({ input: child.stderr! }).on("line", (line) => output.push(line));
    const exited = new Promise<number | null>((resolve) =>
      child.on("exit", (code, signal) => {
        running.delete(child);
        resolve(signal ? null : code);
      }),
    );
    const log = () => output.join("\n");
    const where = await new Promise<Where>((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill("SIGKILL");
        reject(new Error(`the harness did not start a gateway within ${START_TIMEOUT_MS} ms:\n${log()}`));
      }, START_TIMEOUT_MS);
      createInterface({ input: child.stdout! }).once("line", (line) => {
        clearTimeout(timer);
        try {
          resolve(JSON.parse(line) as Where);
        } catch {
          reject(new Error(`the harness printed ${JSON.stringify(line)}, not its JSON line:\n${log()}`));
        }
      });
      void exited.then((code) => {
        clearTimeout(timer);
        reject(new Error(`the harness exited (${code}) before its gateway served:\n${log()}`));
      });
    });
    return new Gateway(child, output, exited, where, new Upstream(where.upstream));
  }

  /** Where the gateway serves gRPC, "127.0.0.1:PORT". */
  get addr(): string {
    return this.where.target;
  }

  /** The PEM file of the CA that signed the gateway's certificate (with tls). */
  get caFile(): string {
    if (this.where.ca_file === null) {
      throw new Error("this gateway serves plaintext: start it with { tls: true } for a CA");
    }
    return this.where.ca_file;
  }

  /** A client certificate the gateway takes (with mutualTls). */
  get clientCertificate(): Issued {
    return issued(this.where.client_cert_file, this.where.client_key_file);
  }

  /** A client certificate of a CA the gateway does not trust (with mutualTls). */
  get otherClientCertificate(): Issued {
    return issued(this.where.other_client_cert_file, this.where.other_client_key_file);
  }

  /** The gateway's process id: a test that kills the gateway makes its harness exit 1, and stop() reject. */
  get gatewayPid(): number {
    return this.where.gateway_pid;
  }

  get embeddingModel(): string {
    return this.where.embedding_model;
  }

  /** Closes the harness's stdin, so it stops the gateway and the upstream; rejects when it does not exit 0. */
  async stop(): Promise<void> {
    this.child.stdin!.end();
    const timer = setTimeout(() => this.child.kill("SIGKILL"), STOP_TIMEOUT_MS);
    const code = await this.exited;
    clearTimeout(timer);
    if (code !== 0) {
      throw new Error(`the harness exited with ${code} on stop:\n${this.log()}`);
    }
  }

  /** The harness's stderr so far: the gateway's log. */
  log(): string {
    return this.output.join("\n");
  }
}

function issued(certFile: string | null, keyFile: string | null): Issued {
  if (certFile === null || keyFile === null) {
    throw new Error("this gateway takes no client certificate: start it with { mutualTls: true } for one");
  }
  return { cert: readFileSync(certFile), key: readFileSync(keyFile) };
}

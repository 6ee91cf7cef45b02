/**
 * The channel, end to end: retries by the channel itself after the gateway's pushback (the contract's service
 * config), interceptors, calls without a deadline, the transport rule against a plaintext and a TLS gateway
 * (tests/harness.py, with --tls for the latter), and a gateway with mutual TLS (--mutual-tls).
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import tls from "node:tls";
import { after, afterEach, before, beforeEach, describe, test } from "node:test";

import { Metadata, Server, ServerCredentials, type ServerErrorResponse } from "@grpc/grpc-js";

import {
  AttemptOutcome,
  ChannelCredentials,
  Client,
  DOMAIN,
  InterceptingCall,
  LLMRelayError,
  LLMServiceService,
  MAX_TIMEOUT_MS,
  SERVICE_CONFIG_JSON,
  status,
  user,
  type ClientOptions,
  type Interceptor,
} from "../src";
import { ErrorInfo, RetryInfo } from "../src/gen/google/rpc/error_details";
import { Status } from "../src/gen/google/rpc/status";
import { Gateway, type Upstream } from "./gateway";

let gateway: Gateway;
let upstream: Upstream;
const clients: Client[] = [];

function connect(addr: string, options: ClientOptions = {}): Client {
  const client = new Client(addr, { timeoutMs: 30_000, ...options });
  clients.push(client);
  return client;
}

before(async () => {
  gateway = await Gateway.start();
  upstream = gateway.upstream;
});

after(async () => {
  for (const client of clients) {
    client.close();
  }
  await gateway?.stop();
});

/** The upstream's 503 with Retry-After 1: the gateway (no retries of its own) answers UNAVAILABLE, pushback 1000 ms. */
const UNAVAILABLE_FOR_1_S = { status: 503, retry_after: 1 };
/** The policy's first backoff is at most 0.25 s: a retry this much later waited for the pushback. */
const WAITED_FOR_PUSHBACK_MS = 800;

async function mustFail(promise: Promise<unknown>, code: status): Promise<LLMRelayError> {
  const err = await promise.then(
    () => assert.fail(`the call succeeded; want ${status[code]}`),
    (caught: unknown) => caught,
  );
  assert.ok(err instanceof LLMRelayError, `not an LLMRelayError: ${String(err)}`);
  assert.equal(err.code, code, err.message);
  return err;
}

describe("retries by the channel", { concurrency: false }, () => {
  beforeEach(async () => {
    await upstream.clearFaults();
  });

  test("complete succeeds on the channel's retry after the gateway's pushback", async () => {
    await upstream.addFaults(UNAVAILABLE_FOR_1_S);
    const before = await upstream.requestCount();
    const began = Date.now();
    const answer = await connect(gateway.addr).complete({ messages: [user("once more")] });
    const took = Date.now() - began;
    assert.equal(answer.message?.content, "echo: once more");
    assert.equal(await upstream.requestCount(), before + 2, "the upstream saw the failure and the retry");
    assert.ok(took >= WAITED_FOR_PUSHBACK_MS, `the retry came ${took} ms after the call, before the 1 s pushback`);
  });

  test("a stream that has received nothing is retried too", async () => {
    await upstream.addFaults(UNAVAILABLE_FOR_1_S);
    const before = await upstream.requestCount();
    const answer = await connect(gateway.addr).collect({ messages: [user("stream it")] });
    assert.equal(answer.message?.content, "echo: stream it");
    assert.equal(await upstream.requestCount(), before + 2);
  });

  test("with retries off the caller sees the failure, its RetryInfo and its pushback", async () => {
    await upstream.addFaults(UNAVAILABLE_FOR_1_S, UNAVAILABLE_FOR_1_S);
    const before = await upstream.requestCount();
    const client = connect(gateway.addr, { channelOptions: { "grpc.enable_retries": 0 } });
    const err = await mustFail(client.complete({ messages: [user("no retry")] }), status.UNAVAILABLE);
    assert.equal(err.retryDelayMs, 1_000);
    assert.deepEqual(err.metadata.get("grpc-retry-pushback-ms"), ["1000"]);
    // The AttemptHistory detail: the one attempt on "ollama", with the upstream's status.
    assert.deepEqual(
      err.attempts.map((a) => [a.backend, a.outcome, a.upstreamStatus]),
      [["ollama", AttemptOutcome.ATTEMPT_OUTCOME_SERVER_ERROR, 503]],
    );
    assert.equal(await upstream.requestCount(), before + 1);
  });

  test("a service config of the caller's replaces the default one", async () => {
    const config = JSON.parse(SERVICE_CONFIG_JSON) as { methodConfig: { retryPolicy: { maxAttempts: number } }[] };
    assert.equal(config.methodConfig[0]!.retryPolicy.maxAttempts, 3);
    config.methodConfig[0]!.retryPolicy.maxAttempts = 2;
    await upstream.addFaults(UNAVAILABLE_FOR_1_S, UNAVAILABLE_FOR_1_S, UNAVAILABLE_FOR_1_S);
    const before = await upstream.requestCount();
    const client = connect(gateway.addr, { channelOptions: { "grpc.service_config": JSON.stringify(config) } });
    await mustFail(client.complete({ messages: [user("twice only")] }), status.UNAVAILABLE);
    assert.equal(await upstream.requestCount(), before + 2);
  });
});

describe("call options", { concurrency: false }, () => {
  beforeEach(async () => {
    await upstream.clearFaults();
  });

  test("interceptors run on every call", async () => {
    const methods: string[] = [];
    // Names the caller through metadata, as an auth interceptor would add a token.
    const namesCaller: Interceptor = (options, nextCall) => {
      methods.push(options.method_definition.path);
      return new InterceptingCall(nextCall(options), {
        start: (metadata, listener, next) => {
          metadata.set("x-llmrelay-caller", "from-an-interceptor");
          next(metadata, listener);
        },
      });
    };
    const client = connect(gateway.addr, { interceptors: [namesCaller] });
    await client.complete({ messages: [user("who is calling?")] });
    const usage = await client.getUsage({ caller: "from-an-interceptor" });
    assert.equal(usage.records.length, 1, JSON.stringify(usage));
    assert.deepEqual(methods, ["/llmrelay.v1.LLMService/Complete", "/llmrelay.v1.LLMService/GetUsage"]);
  });

  test("timeoutMs: null makes a call without a deadline; the client's default stays for the others", async () => {
    await upstream.addFaults({ stall_s: 2 }, { stall_s: 2 });
    const client = connect(gateway.addr, { timeoutMs: 1_000 });
    const answer = await client.complete({ messages: [user("take your time")] }, { timeoutMs: null });
    assert.equal(answer.message?.content, "echo: take your time");
    await mustFail(client.complete({ messages: [user("too slow")] }), status.DEADLINE_EXCEEDED);
  });

  test("a timeoutMs or deadline grpc-js cannot keep is refused, saying what to give", async () => {
    const client = connect(gateway.addr);
    const said = /timeoutMs is .*: give a number of milliseconds > 0 and at most 1000000000000, or null for no/;
    await assert.rejects(client.complete({ messages: [user("x")] }, { timeoutMs: 0 }), said);
    // Past grpc-js's 1e8 hours it threw from its own code, outside the call: the process ended.
    await assert.rejects(client.complete({ messages: [user("x")] }, { timeoutMs: Number.MAX_SAFE_INTEGER }), said);
    const far = new Date(Date.now() + 4e14);
    await assert.rejects(
      client.complete({ messages: [user("x")] }, { deadline: far }),
      /deadline is .*: give a Date at most 1000000000000 ms from now/,
    );
    await assert.rejects(
      client.complete({ messages: [user("x")] }, { deadline: new Date(Number.NaN) }),
      /deadline is an invalid Date/,
    );
    assert.throws(() => connect(gateway.addr, { timeoutMs: 4e14 }), said);
    await assert.rejects(client.collect({ messages: [user("x")] }, { timeoutMs: 4e14 }), said);
    // What is no number, from plain JavaScript: "30000" (an environment variable's) and true passed the comparisons,
    // and every call then failed with grpc-js's own error, or had a deadline of 1 ms.
    for (const [timeoutMs, type] of [
      ["30000", "a string"],
      [true, "a boolean"],
    ]) {
      const notANumber = { timeoutMs } as unknown as ClientOptions;
      const refused = (err: unknown) => {
        assert.ok(err instanceof TypeError, String(err));
        assert.ok(err.message.startsWith(`timeoutMs is ${type}: `), err.message);
        assert.match(err.message, said);
        return true;
      };
      assert.throws(() => connect(gateway.addr, notANumber), refused);
      await assert.rejects(client.complete({ messages: [user("x")] }, notANumber), refused);
      await assert.rejects(client.stream({ messages: [user("x")] }, notANumber).next(), refused);
    }
    const answer = await client.complete({ messages: [user("x")] }, { timeoutMs: MAX_TIMEOUT_MS });
    assert.equal(answer.message?.content, "echo: x");
  });
});

describe("the transport rule against a TLS gateway on loopback", { concurrency: false }, () => {
  let tlsGateway: Gateway;
  let rootCerts: Buffer;
  let port: string;

  before(async () => {
    tlsGateway = await Gateway.start({ tls: true });
    rootCerts = readFileSync(tlsGateway.caFile);
    port = tlsGateway.addr.split(":").at(-1)!;
  });

  after(async () => {
    await tlsGateway?.stop();
  });

  test("TLS with the gateway's CA works, by address and by name", async () => {
    for (const target of [`127.0.0.1:${port}`, `localhost:${port}`, `dns:///localhost:${port}`]) {
      const client = connect(target, { tls: { rootCerts } });
      assert.equal(client.transport, "tls");
      const answer = await client.complete({ messages: [user(`over TLS to ${target}`)] });
      assert.equal(answer.message?.content, `echo: over TLS to ${target}`);
    }
  });

  test("a default client (plaintext to loopback) fails clearly, saying what to pass", async () => {
    const client = connect(tlsGateway.addr, { timeoutMs: 10_000 });
    assert.equal(client.transport, "plaintext");
    const err = await mustFail(client.complete({ messages: [user("plaintext?")] }), status.UNAVAILABLE);
    assert.match(err.message, /in plaintext \(the default for loopback targets\); if the gateway serves TLS, pass/);
  });

  test("a client told to use plaintext fails without the rule's hint: the rule did not choose", async () => {
    const client = connect(tlsGateway.addr, { insecure: true, timeoutMs: 10_000 });
    assert.equal(client.transport, "plaintext");
    const err = await mustFail(client.complete({ messages: [user("plaintext!")] }), status.UNAVAILABLE);
    assert.doesNotMatch(err.message, /default for loopback targets/);
  });

  test("TLS without the gateway's CA is refused", async () => {
    const client = connect(tlsGateway.addr, { insecure: false, timeoutMs: 10_000 });
    assert.equal(client.transport, "tls");
    const err = await mustFail(client.complete({ messages: [user("who are you?")] }), status.UNAVAILABLE);
    assert.doesNotMatch(err.message, /plaintext/);
  });
});

describe("a gateway that asks for a client certificate (mutual TLS)", { concurrency: false }, () => {
  let mutual: Gateway;
  let ca: Buffer;

  before(async () => {
    mutual = await Gateway.start({ mutualTls: true });
    ca = readFileSync(mutual.caFile);
  });

  after(async () => {
    await mutual?.stop();
  });

  const noCertificate =
    " (if the gateway asks for a client certificate (mutual TLS), this client gave none: pass" +
    " { tls: { rootCerts, privateKey, certChain } } with one its server.tls.client_ca_file trusts)";
  const notTaken =
    " (if the gateway asks for a client certificate (mutual TLS), it did not take this client's: it must be issued" +
    " by a CA in the gateway's server.tls.client_ca_file)";

  /**
   * How a unary call and a stream of a client of its own fail: its own subchannel, so that no other client's failed
   * connection (grpc-js's global pool shares them between equal credentials) speaks for it.
   */
  async function failures(target: string, options: ClientOptions): Promise<LLMRelayError[]> {
    const client = connect(target, {
      timeoutMs: 10_000,
      ...options,
      channelOptions: { "grpc.use_local_subchannel_pool": 1 },
    });
    const unary = await mustFail(client.health(), status.UNAVAILABLE);
    const stream = await mustFail(client.collect({ messages: [user("over mutual TLS")] }), status.UNAVAILABLE);
    return [unary, stream];
  }

  /**
   * The gateway (gRPC's core) closes the connection of a client it does not take without a word, and grpc-js says
   * only "Failed to connect": the message then ends with what to give it. Failures the client can tell itself keep
   * their own words, and no hint of client certificates; credentials of the caller's own get none either (what they
   * present is not known).
   */
  test("certificates TLS cannot use are refused when the client is made, naming the option", () => {
    // As the Python and Go SDKs refuse them: roots without a certificate failed every call UNAVAILABLE as if the
    // gateway's certificate were untrusted, and a key and certificate swapped threw OpenSSL's words alone.
    const mine = mutual.clientCertificate;
    const other = mutual.otherClientCertificate;
    const cases: [ClientOptions["tls"], RegExp][] = [
      [{ rootCerts: Buffer.from("garbage") }, /ClientOptions\.tls\.rootCerts: no PEM certificate in it/],
      [{ rootCerts: mine.key }, /ClientOptions\.tls\.rootCerts: no PEM certificate in it/],
      [{ rootCerts: ca, privateKey: mine.cert, certChain: mine.key }, /privateKey and certChain: .*are they swapped/],
      [{ rootCerts: ca, privateKey: other.key, certChain: mine.cert }, /privateKey: not the key of the certificate/],
    ];
    for (const [tls, said] of cases) {
      assert.throws(() => connect(mutual.addr, { tls }), said);
    }
    const good = connect(mutual.addr, { tls: { rootCerts: ca, privateKey: mine.key, certChain: mine.cert } });
    assert.equal(good.transport, "tls");
  });

  test("no certificate, or one of another CA, is told of; other failures are not", async () => {
    const stranger = mutual.otherClientCertificate;
    const cases: [string, string, ClientOptions, string, string | undefined][] = [
      ["no client certificate", mutual.addr, { tls: { rootCerts: ca } }, "Failed to connect (", noCertificate],
      [
        "one of another CA",
        mutual.addr,
        { tls: { rootCerts: ca, privateKey: stranger.key, certChain: stranger.cert } },
        "Failed to connect (",
        notTaken,
      ],
      [
        "a server it does not trust",
        mutual.addr,
        { tls: { rootCerts: stranger.cert } }, // a certificate, not the server's CA
        "unable to verify the first certificate",
        undefined,
      ],
      ["a plaintext gateway", gateway.addr, { tls: { rootCerts: ca } }, "wrong version number", undefined],
      [
        "credentials of the caller's own",
        mutual.addr,
        { credentials: ChannelCredentials.createSsl(ca) },
        "Failed to connect (",
        undefined,
      ],
    ];
    for (const [name, target, options, said, hint] of cases) {
      for (const err of await failures(target, options)) {
        assert.ok(err.details.includes(said), `${name}: ${err.message}`);
        if (hint === undefined) {
          assert.doesNotMatch(err.message, /client certificate/, name);
        } else {
          assert.ok(err.message.endsWith(hint), `${name}: ${err.message}`);
        }
      }
    }
  });

  test("under TLS 1.2 the gateway closes within the handshake, and is told of too", async () => {
    // Read when a client makes its credentials (grpc-js's secure context): TLS 1.2 for the two made here alone.
    const stranger = mutual.otherClientCertificate;
    const maxVersion = tls.DEFAULT_MAX_VERSION;
    tls.DEFAULT_MAX_VERSION = "TLSv1.2";
    let pending: Promise<LLMRelayError[]>[];
    try {
      pending = [
        failures(mutual.addr, { tls: { rootCerts: ca } }),
        failures(mutual.addr, { tls: { rootCerts: ca, privateKey: stranger.key, certChain: stranger.cert } }),
      ];
    } finally {
      tls.DEFAULT_MAX_VERSION = maxVersion;
    }
    const [none, given] = await Promise.all(pending);
    const said = "Client network socket disconnected before secure TLS connection was established";
    for (const [errors, hint] of [
      [none, noCertificate],
      [given, notTaken],
    ] as const) {
      for (const err of errors) {
        assert.ok(err.details.includes(said), err.message);
        assert.ok(err.message.endsWith(hint), err.message);
      }
    }
  });

  test("a certificate of its client CA is taken", async () => {
    const client = mutual.clientCertificate;
    const mine = connect(mutual.addr, { tls: { rootCerts: ca, privateKey: client.key, certChain: client.cert } });
    const answer = await mine.complete({ messages: [user("over mutual TLS")] });
    assert.equal(answer.message?.content, "echo: over mutual TLS");
  });
});

describe("the transport rule against a plaintext gateway by a name that is not loopback", () => {
  /**
   * The gateway's address as 127.1: the rule reads it as a name (node:net's isIP does not take it), so TLS, and the
   * resolver reaches 127.0.0.1.
   */
  let target: string;

  before(() => {
    target = `127.1:${gateway.addr.split(":").at(-1)!}`;
  });

  test("a default client (TLS to a name) fails clearly, saying what to pass", async () => {
    const client = connect(target, { timeoutMs: 10_000 });
    assert.equal(client.transport, "tls");
    const err = await mustFail(client.complete({ messages: [user("TLS?")] }), status.UNAVAILABLE);
    const hint =
      "over TLS with the system's roots (the default for targets that are not loopback); if the gateway serves" +
      " plaintext, pass { insecure: true }";
    assert.ok(err.message.includes(hint), err.message);
  });

  test("a client told to use TLS fails without the rule's hint, and plaintext as the hint says works", async () => {
    const told = connect(target, { insecure: false, timeoutMs: 10_000 });
    const err = await mustFail(told.complete({ messages: [user("TLS!")] }), status.UNAVAILABLE);
    assert.doesNotMatch(err.message, /not loopback|insecure: true/);
    const plaintext = connect(target, { insecure: true });
    const answer = await plaintext.complete({ messages: [user("plaintext to a name")] });
    assert.equal(answer.message?.content, "echo: plaintext to a name");
  });
});

describe("a gateway that died", () => {
  let dying: Gateway;

  beforeEach(async () => {
    dying = await Gateway.start(); // each test's own: it kills it
  });

  afterEach(async () => {
    await dying?.stop().catch(() => {}); // the harness exits 1 as its gateway died: by the test's hand
  });

  test("cut a stream: it fails without the transport rule's hint, the gateway reached in plaintext", async () => {
    // A delta every 2 s: the gateway still streams when killed, however late a busy machine runs the test after its
    // second chunk (the kill comes then: the wait costs nothing).
    await dying.upstream.addFaults({ trickle_s: 2 });
    const client = connect(dying.addr);
    assert.equal(client.transport, "plaintext");
    let received = 0;
    const err = await (async () => {
      for await (const _ of client.stream({ messages: [user("one two three four five six seven eight")] })) {
        if (++received === 2) {
          process.kill(dying.gatewayPid, "SIGKILL");
        }
      }
    })().then(
      () => assert.fail("the stream ended without an error"),
      (caught: unknown) => caught,
    );
    assert.equal(received, 2);
    assert.ok(err instanceof LLMRelayError, `not an LLMRelayError: ${String(err)}`);
    assert.equal(err.code, status.UNAVAILABLE, err.message);
    assert.doesNotMatch(err.message, /plaintext|loopback|gateway serves TLS/);
    // Nor the calls after it, refused a connection: they were told to try TLS, by a client that had been talking
    // plaintext to that gateway all along.
    const refused = await client.complete({ messages: [user("hi")] }).then(
      () => assert.fail("a call to a dead gateway succeeded"),
      (caught: unknown) => caught,
    );
    assert.ok(refused instanceof LLMRelayError, `not an LLMRelayError: ${String(refused)}`);
    assert.equal(refused.code, status.UNAVAILABLE, refused.message);
    assert.doesNotMatch(refused.message, /plaintext|loopback|gateway serves TLS/);
  });

  test("after answering an error was reached: the calls after it fail without the rule's hint", async () => {
    // An error comes trailers-only, no headers: the client counted the gateway as never reached, and once it was
    // gone told its caller to try TLS, though it had been answered in plaintext.
    const client = connect(dying.addr);
    await mustFail(client.complete({ messages: [user("hi")], model: "no-such/model" }), status.NOT_FOUND);
    process.kill(dying.gatewayPid, "SIGKILL");
    const refused = await mustFail(client.complete({ messages: [user("hi")] }), status.UNAVAILABLE);
    assert.doesNotMatch(refused.message, /plaintext|loopback|gateway serves TLS/);
  });
});

/** The error a stream of `client` ends with, having asked for "hi". */
async function streamError(client: Client): Promise<unknown> {
  return (async () => {
    for await (const _ of client.stream({ messages: [user("hi")] })) {
      // Nothing comes before the error.
    }
  })().then(
    () => assert.fail("the stream ended without an error"),
    (caught: unknown) => caught,
  );
}

describe("a call that fails before any gateway answers", () => {
  test("an interceptor that fails the call in start() fails it with an LLMRelayError of its status", async () => {
    // An interceptor with no token to add, say: grpc-js calls back inside the call's start. complete() rejected with
    // a ReferenceError, and stream() threw grpc-js's own Error.
    const refuses: Interceptor = (options, nextCall) =>
      new InterceptingCall(nextCall(options), {
        start: (_metadata, listener) => {
          listener.onReceiveStatus({ code: status.UNAUTHENTICATED, details: "no token", metadata: new Metadata() });
        },
        sendMessage: () => {},
        halfClose: () => {},
      });
    const client = connect("127.0.0.1:1", { interceptors: [refuses] }); // never dialled: the interceptor answers
    const err = await mustFail(client.complete({ messages: [user("hi")] }), status.UNAUTHENTICATED);
    assert.equal(err.details, "no token");
    const streamed = await streamError(client);
    assert.ok(streamed instanceof LLMRelayError, `not an LLMRelayError: ${String(streamed)}`);
    assert.equal(streamed.code, status.UNAUTHENTICATED, streamed.message);
  });
});

describe("a server whose grpc-status-details-bin is not what the gateway sends", () => {
  let server: Server;
  let addr: string;
  let trailer: Buffer;

  before(async () => {
    server = new Server();
    const fail = (): ServerErrorResponse => {
      const metadata = new Metadata();
      metadata.set("grpc-status-details-bin", trailer);
      return { name: "Error", message: "overloaded", code: status.UNAVAILABLE, details: "overloaded", metadata };
    };
    server.addService(LLMServiceService, {
      complete: (_call: unknown, callback: (err: ServerErrorResponse) => void) => callback(fail()),
      streamComplete: (call: { emit(event: "error", err: ServerErrorResponse): void }) => call.emit("error", fail()),
    });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (err, bound) =>
        err ? reject(err) : resolve(bound),
      ),
    );
    addr = `127.0.0.1:${port}`;
  });

  after(() => {
    server?.forceShutdown();
  });

  test("a trailer that is no google.rpc.Status leaves the call's code and message", async () => {
    // From a proxy, say. The decode error escaped grpc-js's callback: complete() never settled, stream() threw it.
    trailer = Buffer.from([0xff, 0xff, 0xff, 0xff, 0x0f]);
    const client = connect(addr, { channelOptions: { "grpc.enable_retries": 0 } });
    const err = await mustFail(client.complete({ messages: [user("hi")] }), status.UNAVAILABLE);
    assert.equal(err.details, "overloaded");
    const streamed = await streamError(client);
    assert.ok(streamed instanceof LLMRelayError, `not an LLMRelayError: ${String(streamed)}`);
    assert.equal(streamed.code, status.UNAVAILABLE, streamed.message);
  });

  test("a detail that does not decode is skipped, and the others are read", async () => {
    const errorInfo = Buffer.from(ErrorInfo.encode({ reason: "OVERLOADED", domain: DOMAIN, metadata: {} }).finish());
    trailer = Buffer.from(
      Status.encode({
        code: status.UNAVAILABLE,
        message: "overloaded",
        details: [
          { typeUrl: "type.googleapis.com/google.rpc.RetryInfo", value: Buffer.from([0xff, 0xff, 0xff, 0xff, 0x0f]) },
          { typeUrl: "type.googleapis.com/google.rpc.ErrorInfo", value: errorInfo },
        ],
      }).finish(),
    );
    const client = connect(addr, { channelOptions: { "grpc.enable_retries": 0 } });
    const err = await mustFail(client.complete({ messages: [user("hi")] }), status.UNAVAILABLE);
    assert.equal(err.reason, "OVERLOADED");
    assert.equal(err.retryInfo, undefined);
  });

  test("the first of two details of a type is read (a proxy may add one), as in the other SDKs", async () => {
    const detail = (type: string, value: Uint8Array) => ({
      typeUrl: `type.googleapis.com/${type}`,
      value: Buffer.from(value),
    });
    const info = (reason: string) =>
      detail("google.rpc.ErrorInfo", ErrorInfo.encode({ reason, domain: DOMAIN, metadata: {} }).finish());
    const retry = (seconds: number) =>
      detail("google.rpc.RetryInfo", RetryInfo.encode({ retryDelay: { seconds, nanos: 0 } }).finish());
    trailer = Buffer.from(
      Status.encode({
        code: status.UNAVAILABLE,
        message: "overloaded",
        details: [info("UPSTREAM_UNAVAILABLE"), retry(2), info("OVERLOADED"), retry(9)],
      }).finish(),
    );
    const client = connect(addr, { channelOptions: { "grpc.enable_retries": 0 } });
    const err = await mustFail(client.complete({ messages: [user("hi")] }), status.UNAVAILABLE);
    assert.equal(err.reason, "UPSTREAM_UNAVAILABLE");
    assert.equal(err.retryInfo?.retryDelay?.seconds, 2);
  });

  test("a detail packed under another host than type.googleapis.com is read by its name", async () => {
    const errorInfo = ErrorInfo.encode({ reason: "UPSTREAM_RATE_LIMITED", domain: DOMAIN, metadata: {} }).finish();
    const retryInfo = RetryInfo.encode({ retryDelay: { seconds: 3, nanos: 0 } }).finish();
    trailer = Buffer.from(
      Status.encode({
        code: status.UNAVAILABLE,
        message: "overloaded",
        details: [
          { typeUrl: "type.example.com/google.rpc.ErrorInfo", value: Buffer.from(errorInfo) },
          { typeUrl: "google.rpc.RetryInfo", value: Buffer.from(retryInfo) },
        ],
      }).finish(),
    );
    const client = connect(addr, { channelOptions: { "grpc.enable_retries": 0 } });
    const err = await mustFail(client.complete({ messages: [user("hi")] }), status.UNAVAILABLE);
    assert.equal(err.reason, "UPSTREAM_RATE_LIMITED");
    assert.equal(err.retryInfo?.retryDelay?.seconds, 3);
  });
});

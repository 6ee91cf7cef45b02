/**
 * End-to-end tests: the real gateway in front of the fake OpenAI upstream (both started by tests/harness.py, on
 * loopback), called through this package's Client.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { getEventListeners } from "node:events";
import { after, before, beforeEach, describe, test } from "node:test";

import { status } from "@grpc/grpc-js";

import {
  AttemptOutcome,
  CircuitState,
  Client,
  DOMAIN,
  ErrorReason,
  FinishReason,
  InterruptPolicy,
  LLMRelayError,
  Role,
  StreamCompleteRequest,
  functionTool,
  isRestart,
  parseError,
  system,
  user,
  type ClientOptions,
  type MessageInput,
  type StreamCompleteResponse,
  type StreamInput,
  type StreamRestart,
} from "../src";
import { Gateway, type Upstream } from "./gateway";

let upstream: Upstream;
let gateway: Gateway;
const clients: Client[] = [];

/** A client with the defaults (plaintext, as to every loopback target) and a 30 s deadline. */
function connect(addr: string = gateway.addr, options: ClientOptions = {}): Client {
  const client = new Client(addr, { timeoutMs: 30_000, ...options });
  clients.push(client);
  return client;
}

/** A stream fault of the upstream: one word every 20 ms, so that each reaches the gateway on its own. */
const TRICKLE = { trickle_s: 0.02 };

function chat(text: string): MessageInput[] {
  return [system("Be brief."), user(text)];
}

async function collect(client: Client, request: StreamInput, timeoutMs?: number): Promise<StreamCompleteResponse[]> {
  const chunks: StreamCompleteResponse[] = [];
  for await (const chunk of client.stream(request, { timeoutMs })) {
    chunks.push(chunk);
  }
  return chunks;
}

/** Asserts that the promise rejects with an LLMRelayError of the code, and returns it. */
async function mustFail(promise: Promise<unknown>, code: status): Promise<LLMRelayError> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof LLMRelayError, `not an LLMRelayError: ${String(err)}`);
    assert.equal(err.codeName, status[code], err.message);
    assert.equal(parseError(err), err);
    return err;
  }
  assert.fail(`the call succeeded; want ${status[code]}`);
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

describe("llmrelay gateway, from TypeScript", { concurrency: false }, () => {
  beforeEach(async () => {
    await upstream.clearFaults();
  });

  test("complete", async () => {
    const answer = await connect().complete({ messages: chat("hello from TypeScript") });
    assert.equal(answer.message?.content, "echo: hello from TypeScript");
    assert.equal(answer.message?.role, Role.ROLE_ASSISTANT);
    assert.equal(answer.backend, "ollama");
    assert.equal(answer.model, "tiny");
    assert.equal(answer.finishReason, FinishReason.FINISH_REASON_STOP);
    assert.ok((answer.usage?.totalTokens ?? 0) > 0);
    assert.equal(answer.attempts.at(-1)?.outcome, AttemptOutcome.ATTEMPT_OUTCOME_SUCCEEDED);
  });

  test("stream gives every chunk, and they add up to the unary answer", async () => {
    const client = connect();
    const prompt = "stream these several words one by one";
    // The stream's words a moment apart: the gateway relays what arrives together as one message.
    await upstream.addFaults({}, TRICKLE);
    const unary = await client.complete({ messages: chat(prompt) });
    const chunks = await collect(client, { messages: chat(prompt) });
    assert.ok(chunks.length >= 3, `${chunks.length} chunks; want the answer in several`);
    const text = chunks.map((c) => c.delta?.content ?? "").join("");
    assert.equal(text, unary.message?.content);
    chunks.forEach((chunk, i) => {
      assert.equal(chunk.id, chunks[0]!.id);
      assert.equal(chunk.backend, "ollama");
      const last = i === chunks.length - 1;
      assert.equal(chunk.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED, last, `chunk ${i}`);
    });
    const last = chunks.at(-1)!;
    assert.equal(last.finishReason, FinishReason.FINISH_REASON_STOP);
    assert.ok((last.usage?.totalTokens ?? 0) > 0);
  });

  test("breaking out of a stream early cancels it", async () => {
    const client = connect();
    for await (const chunk of client.stream({ messages: chat("one two three four five") })) {
      assert.ok(chunk.delta);
      break;
    }
    // The channel still works afterwards.
    const answer = await client.complete({ messages: chat("still there?") });
    assert.equal(answer.message?.content, "echo: still there?");
  });

  test("countTokens", async () => {
    const client = connect();
    const text = "The quick brown fox jumps over the lazy dog.";
    const byText = await client.countTokens({ text });
    assert.ok(byText.tokenCount >= 5, JSON.stringify(byText));
    assert.ok(byText.encoding !== "");
    const byChat = await client.countTokens({ messages: chat(text) });
    assert.ok(byChat.tokenCount > byText.tokenCount, "a chat counts its format's overhead on top");
  });

  test("embed gives a vector per input, in order, from the embedding model", async () => {
    const client = connect();
    const texts = ["first text", "second text", "third text"];
    const answer = await client.embed({ inputs: texts });
    assert.equal(answer.backend, "ollama");
    assert.equal(answer.model, gateway.embeddingModel);
    assert.equal(answer.usage?.promptTokens, 6);
    assert.equal(answer.usage?.estimated, false);
    assert.equal(answer.embeddings.length, texts.length);
    // Each text's vector is the one it gets on its own (the fake upstream's are a function of the text).
    for (const [i, text] of texts.entries()) {
      const alone = await client.embed({ inputs: [text] });
      assert.equal(answer.embeddings[i]!.values.length, 1536);
      assert.deepEqual(answer.embeddings[i]!.values, alone.embeddings[0]!.values, `vector ${i}`);
    }
    const short = await client.embed({ inputs: texts.slice(0, 1), dimensions: 8 });
    assert.equal(short.embeddings[0]!.values.length, 8);
  });

  test("embed with no inputs is INVALID_ARGUMENT on inputs; an unknown model NOT_FOUND", async () => {
    const client = connect();
    const invalid = await mustFail(client.embed({ inputs: [] }), status.INVALID_ARGUMENT);
    assert.deepEqual(invalid.fieldViolations.map((v) => v.field), ["inputs"]);
    const missing = await mustFail(client.embed({ inputs: ["x"], model: "no-such-model" }), status.NOT_FOUND);
    assert.equal(missing.errorReason, ErrorReason.ERROR_REASON_MODEL_NOT_FOUND);
  });

  test("health", async () => {
    const health = await connect().health(true);
    assert.equal(health.serving, true);
    assert.equal(health.backends.length, 1);
    const backend = health.backends[0]!;
    assert.equal(backend.name, "ollama");
    assert.equal(backend.reachable, true);
    assert.equal(backend.defaultModel, "tiny");
    assert.equal(backend.circuitState, CircuitState.CIRCUIT_STATE_CLOSED);
  });

  test("a rate-limited upstream gives RESOURCE_EXHAUSTED with ErrorInfo and RetryInfo", async () => {
    await upstream.addFaults({ status: 429, retry_after: 3 });
    const err = await mustFail(connect().complete({ messages: chat("too many") }), status.RESOURCE_EXHAUSTED);
    assert.equal(err.reason, "UPSTREAM_RATE_LIMITED");
    assert.equal(err.errorReason, ErrorReason.ERROR_REASON_UPSTREAM_RATE_LIMITED);
    assert.equal(err.errorInfo?.domain, DOMAIN);
    const delay = err.retryDelayMs;
    assert.ok(delay !== undefined && delay >= 2_500 && delay <= 3_500, `retry delay ${delay} ms, want about 3 s`);
  });

  test("a rate-limited stream throws the same details", async () => {
    await upstream.addFaults({ status: 429, retry_after: 2 });
    const err = await mustFail(collect(connect(), { messages: chat("too many") }), status.RESOURCE_EXHAUSTED);
    assert.equal(err.reason, "UPSTREAM_RATE_LIMITED");
    const delay = err.retryDelayMs;
    assert.ok(delay !== undefined && delay >= 1_500 && delay <= 2_500, `retry delay ${delay} ms, want about 2 s`);
  });

  test("an empty chat is INVALID_ARGUMENT with a BadRequest on messages", async () => {
    const err = await mustFail(connect().complete({ messages: [] }), status.INVALID_ARGUMENT);
    assert.equal(err.reason, "INVALID_REQUEST");
    assert.equal(err.fieldViolations[0]?.field, "messages");
    assert.deepEqual(err.attempts, [], "a refused request tried no backend");
  });

  test("the deadline holds while the upstream stalls", async () => {
    await upstream.addFaults({ stall_s: 5 }, { stall_s: 5 });
    const client = connect();
    let began = Date.now();
    await mustFail(client.complete({ messages: chat("slow") }, { timeoutMs: 1_000 }), status.DEADLINE_EXCEEDED);
    assert.ok(Date.now() - began < 3_000, `the call took ${Date.now() - began} ms with a 1 s deadline`);
    began = Date.now();
    await mustFail(collect(client, { messages: chat("slow") }, 1_000), status.DEADLINE_EXCEEDED);
    assert.ok(Date.now() - began < 3_000, `the stream took ${Date.now() - began} ms with a 1 s deadline`);
  });

  test("the client's timeoutMs applies to calls that set no deadline", async () => {
    await upstream.addFaults({ stall_s: 5 });
    const client = connect(gateway.addr, { timeoutMs: 1_000 });
    await mustFail(client.complete({ messages: chat("slow") }), status.DEADLINE_EXCEEDED);
  });

  test("an AbortSignal cancels the call", async () => {
    await upstream.addFaults({ stall_s: 5 });
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 300);
    const call = connect().complete({ messages: chat("slow") }, { signal: controller.signal });
    await mustFail(call, status.CANCELLED);
  });

  test("close() cancels the calls in flight: a stream and a unary call fail CANCELLED at once", async () => {
    // Answers that would take seconds more: a stream of a word a second, and a unary call the upstream stalls.
    await upstream.addFaults({ trickle_s: 1 }, { stall_s: 10 });
    const streaming = connect();
    const chunks = streaming.stream({ messages: chat("one two three four five six seven eight") });
    assert.ok((await chunks.next()).value?.delta, "the answer has begun");
    let closedAt = Date.now();
    streaming.close();
    await mustFail(chunks.next(), status.CANCELLED);
    // Under 2 s of the 8 the stream would take: room for a busy machine, and still "at once".
    assert.ok(Date.now() - closedAt < 2_000, `the stream ran on ${Date.now() - closedAt} ms after close()`);

    const calling = connect();
    const requestsBefore = await upstream.requestCount();
    const answer = calling.complete({ messages: chat("slow") });
    while ((await upstream.requestCount()) === requestsBefore) {
      await new Promise((resolve) => setTimeout(resolve, 20)); // until the gateway asks the upstream
    }
    closedAt = Date.now();
    calling.close();
    await mustFail(answer, status.CANCELLED);
    assert.ok(Date.now() - closedAt < 2_000, `the call ran on ${Date.now() - closedAt} ms after close()`);
  });

  test("a call after close() fails CANCELLED, saying so, as in the Python SDK", async () => {
    const client = connect();
    await client.complete({ messages: chat("before close") });
    client.close();
    const closed = "the client is closed: make a new one to call";
    for (const call of [
      client.complete({ messages: chat("after close") }),
      client.stream({ messages: chat("after close") }).next(),
      client.collect({ messages: chat("after close") }),
    ]) {
      const err = await mustFail(call, status.CANCELLED);
      assert.equal(err.details, closed);
    }
  });

  test("many calls share one AbortSignal without a MaxListenersExceededWarning, and leave no listener", async () => {
    const warnings: Error[] = [];
    const warned = (warning: Error) => warnings.push(warning);
    process.on("warning", warned);
    try {
      const client = connect();
      const controller = new AbortController();
      const calls = Array.from({ length: 20 }, (_, i) =>
        client.complete({ messages: chat(`call ${i}`) }, { signal: controller.signal }),
      );
      assert.equal(getEventListeners(controller.signal, "abort").length, 1);
      await Promise.all(calls);
      assert.equal(getEventListeners(controller.signal, "abort").length, 0);

      // And each call still hears the abort.
      const stalled = Array.from({ length: 12 }, () => ({ stall_s: 5 }));
      await upstream.addFaults(...stalled);
      const cancelled = stalled.map((_, i) =>
        mustFail(client.complete({ messages: chat(`slow ${i}`) }, { signal: controller.signal }), status.CANCELLED),
      );
      setTimeout(() => controller.abort(), 300);
      await Promise.all(cancelled);
      await new Promise((resolve) => setImmediate(resolve)); // process.emitWarning emits on the next tick
    } finally {
      process.off("warning", warned);
    }
    assert.deepEqual(warnings.filter((w) => w.name === "MaxListenersExceededWarning"), []);
  });

  test("an error carries the request id of the gateway's log: the call's own, or the one the gateway made", async () => {
    const client = connect();
    const own = await mustFail(
      client.complete({ messages: [] }, { metadata: { "x-request-id": "node-request-1" } }),
      status.INVALID_ARGUMENT,
    );
    assert.equal(own.requestId, "node-request-1");
    const made = await mustFail(client.complete({ messages: [] }), status.INVALID_ARGUMENT);
    assert.match(made.requestId ?? "", /^[0-9a-f]{32}$/);
    await upstream.addFaults({ status: 429, retry_after: 1 });
    const streamed = await mustFail(
      client.collect({ messages: chat("too many") }, { metadata: { "x-request-id": "node-request-2" } }),
      status.RESOURCE_EXHAUSTED,
    );
    assert.equal(streamed.requestId, "node-request-2");
  });

  test("a signal aborted before the call starts neither a unary call nor a stream", async () => {
    const controller = new AbortController();
    const reason = new Error("the agent gave up");
    controller.abort(reason);
    const client = connect();
    await assert.rejects(client.complete({ messages: chat("never sent") }, { signal: controller.signal }), reason);
    const chunks = client.stream({ messages: chat("never sent") }, { signal: controller.signal });
    await assert.rejects(chunks.next(), reason);
  });


  test("a request that cannot be built or encoded rejects, saying so, and never reaches the gateway", async () => {
    // From plain JavaScript: one message where the contract has a list, and an enum by its name. The first threw
    // synchronously, past any .catch(); the second failed INTERNAL, as if the gateway had.
    const client = connect();
    const before = await upstream.requestCount();
    const notAList = client.complete({ messages: user("hi") } as unknown as StreamInput);
    await assert.rejects(notAList, TypeError);
    const byName = client.complete({ messages: [{ role: "user", content: "hi" }] } as unknown as StreamInput);
    await assert.rejects(byName, (err: unknown) => {
      assert.ok(err instanceof TypeError, String(err));
      assert.match(err.message, /could not be encoded .*an enum is its number \(Role.ROLE_USER, not "user"\)/);
      return true;
    });
    const streamed = client.stream({ messages: [{ role: "user", content: "hi" }] } as unknown as StreamInput);
    await assert.rejects(streamed.next(), TypeError);
    assert.equal(await upstream.requestCount(), before);
  });

  test("metadata gRPC cannot send is a TypeError naming the key, never showing the value", async () => {
    // A key read from a file with its newline: grpc-js rejected every call with its Error, the secret in its message.
    const secret = "Bearer sk-live-SECRET\n";
    const refused = (key: string, rule: RegExp) => (err: unknown) => {
      assert.ok(err instanceof TypeError, String(err));
      assert.ok(err.message.includes(`"${key}"`) && err.message.includes("value not shown"), err.message);
      assert.match(err.message, rule);
      assert.ok(!err.message.includes("SECRET"), err.message);
      return true;
    };
    const printable = /printable ASCII/;
    assert.throws(
      () => new Client(gateway.addr, { metadata: { Authorization: secret } }),
      refused("authorization", printable),
    );
    assert.throws(() => new Client(gateway.addr, { caller: "caf\u00e9" }), refused("x-llmrelay-caller", printable));
    assert.throws(() => new Client(gateway.addr, { metadata: { "bad key": "v" } }), /metadata key "bad key"/);
    const client = connect();
    const before = await upstream.requestCount();
    await assert.rejects(
      client.complete({ messages: chat("never sent") }, { metadata: { authorization: secret } }),
      refused("authorization", printable),
    );
    const stream = client.stream({ messages: chat("never sent") }, { metadata: { authorization: secret } });
    await assert.rejects(stream.next(), refused("authorization", printable));
    await assert.rejects(
      client.complete({ messages: chat("never sent") }, { metadata: { "x-trace-bin": "SECRET" } }),
      refused("x-trace-bin", /a key ending -bin takes a Buffer/),
    );
    await assert.rejects(
      client.complete({ messages: chat("never sent") }, { metadata: { "x-note": Buffer.from("SECRET") } }),
      refused("x-note", printable),
    );
    assert.equal(await upstream.requestCount(), before);
    // Printable ASCII, spaces too, and a Buffer for a key ending -bin, go through.
    const bytes = connect(gateway.addr, { metadata: { "x-trace-bin": Buffer.from([0, 255, 10]) } });
    await bytes.complete({ messages: chat("sent") }, { metadata: { "x-note": " a ~ b " } });
  });

  test("a connection-specific header of HTTP/1 as metadata is a TypeError naming the key", async () => {
    // Node's http2 refuses to send it: grpc-js dropped the client's connection, failing its other calls, and tried
    // the call again at once, a core busy until the deadline (for ever without one).
    const keys = ["connection", "Keep-Alive", "proxy-connection", "transfer-encoding", "upgrade", "http2-settings"];
    const refused = (key: string) => (err: unknown) => {
      assert.ok(err instanceof TypeError, String(err));
      assert.ok(err.message.startsWith(`metadata key "${key}": HTTP/2`), err.message);
      assert.match(err.message, /cannot send a connection-specific header/);
      return true;
    };
    for (const key of keys) {
      assert.throws(() => new Client(gateway.addr, { metadata: { [key]: "close" } }), refused(key));
    }
    const client = connect();
    const before = await upstream.requestCount();
    for (const key of keys) {
      const options = { metadata: { [key]: "close" }, timeoutMs: 1000 };
      await assert.rejects(client.complete({ messages: chat("never sent") }, options), refused(key));
      await assert.rejects(client.stream({ messages: chat("never sent") }, options).next(), refused(key));
    }
    assert.equal(await upstream.requestCount(), before);
    // A "te" goes through: grpc-js sends its own, "trailers", in its place.
    await client.complete({ messages: chat("sent") }, { metadata: { te: "gzip" } });
  });

  test("a metadata key starting grpc- is a TypeError naming the key: gRPC's own, as the Python SDK says", async () => {
    // grpc-js sent it: a call's grpc-status failed it INTERNAL, as though the gateway had, and a client's grpc-timeout
    // gave every call a deadline of 100 ms, met after the upstream was asked.
    const refused = (key: string) => (err: unknown) => {
      assert.ok(err instanceof TypeError, String(err));
      assert.equal(err.message, `metadata key "${key}": keys starting grpc- are gRPC's own (reserved), not a caller's`);
      return true;
    };
    const keys: [string, string | Buffer][] = [
      ["grpc-timeout", "100m"],
      ["GRPC-Status", "x"],
      ["grpc-trace-bin", Buffer.from([0])],
    ];
    for (const [key, value] of keys) {
      assert.throws(() => new Client(gateway.addr, { timeoutMs: null, metadata: { [key]: value } }), refused(key));
    }
    const client = connect();
    const before = await upstream.requestCount();
    for (const [key, value] of keys) {
      const options = { metadata: { [key]: value } };
      await assert.rejects(client.complete({ messages: chat("never sent") }, options), refused(key));
      await assert.rejects(client.stream({ messages: chat("never sent") }, options).next(), refused(key));
    }
    assert.equal(await upstream.requestCount(), before);
  });

  test("metadata that is no object of keys (a string) is a TypeError, never showing it", async () => {
    // Object.entries read a string's letters as keys "0", "1", ..., each a printable value: the client took it.
    const secret = "authorization: Bearer sk-live-SECRET";
    const refused = (kind: string) => (err: unknown) => {
      assert.ok(err instanceof TypeError, String(err));
      assert.equal(
        err.message,
        `metadata: an object of keys and values ({ authorization: "Bearer KEY" }), not ${kind}`,
      );
      return true;
    };
    for (const [metadata, kind] of [
      [secret, "a string"],
      [["authorization", "Bearer sk-live-SECRET"], "an array"],
    ] as const) {
      const options = { metadata } as unknown as ClientOptions;
      assert.throws(() => new Client(gateway.addr, options), refused(kind));
      const client = connect();
      const before = await upstream.requestCount();
      await assert.rejects(client.complete({ messages: chat("never sent") }, options), refused(kind));
      await assert.rejects(client.stream({ messages: chat("never sent") }, options).next(), refused(kind));
      assert.equal(await upstream.requestCount(), before);
    }
  });

  test("a signal that is no AbortSignal (the AbortController) is a TypeError, and no call starts", async () => {
    // From plain JavaScript: the unary call started before the signal was read, so it rejected while the gateway ran
    // it to the end and billed it.
    const client = connect();
    const controller = new AbortController();
    const options = { signal: controller as unknown as AbortSignal };
    const refused = {
      name: "TypeError",
      message: "signal is an AbortController, not an AbortSignal: give an AbortController's .signal",
    };
    const before = await upstream.requestCount();
    await assert.rejects(client.complete({ messages: chat("never sent") }, options), refused);
    await assert.rejects(client.stream({ messages: chat("never sent") }, options).next(), refused);
    // A call after them, on the same connection, and time for one started before it to reach the upstream too.
    await client.complete({ messages: chat("sent") });
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.equal(await upstream.requestCount(), before + 1);
  });

  test("one stop sequence may be given as a string, as OpenAI takes it", async () => {
    // From plain JavaScript, as the Python SDK takes it: it threw inside fromPartial ("stop?.map is not a function").
    await connect().complete({ messages: chat("stop here"), options: { stop: "END" } } as unknown as StreamInput);
    const sent = JSON.parse(await upstream.requests()) as { stop?: unknown }[];
    assert.deepEqual(sent.at(-1)?.stop, ["END"]);
  });

  test("the caller is recorded in the usage ledger", async () => {
    const client = connect(gateway.addr, { caller: "node-e2e" });
    await client.complete({ messages: chat("count me") });
    const usage = await client.getUsage({ caller: "node-e2e" });
    assert.equal(usage.records.length, 1);
    assert.ok(usage.records[0]!.requests >= 1);
  });
});

describe("collect", { concurrency: false }, () => {
  beforeEach(async () => {
    await upstream.clearFaults();
  });

  test("collect gives what complete gives, and onDelta sees every piece", async () => {
    const client = connect();
    const prompt = "collect these words for me";
    await upstream.addFaults({}, TRICKLE);
    const unary = await client.complete({ messages: chat(prompt) });
    const pieces: string[] = [];
    const restarts: StreamRestart[] = [];
    const answer = await client.collect(
      { messages: chat(prompt) },
      { onDelta: (chunk) => pieces.push(chunk.delta?.content ?? ""), onRestart: (r) => restarts.push(r) },
    );
    assert.equal(answer.message?.content, unary.message?.content);
    assert.equal(answer.message?.role, Role.ROLE_ASSISTANT);
    assert.deepEqual(answer.message?.toolCalls, []);
    assert.equal(answer.backend, unary.backend);
    assert.equal(answer.model, unary.model);
    assert.equal(answer.finishReason, unary.finishReason);
    assert.ok((answer.usage?.totalTokens ?? 0) > 0);
    assert.equal(answer.attempts.at(-1)?.outcome, AttemptOutcome.ATTEMPT_OUTCOME_SUCCEEDED);
    assert.ok(pieces.length >= 3, `${pieces.length} pieces; want the answer in several`);
    assert.equal(pieces.join(""), unary.message?.content);
    assert.deepEqual(restarts, []);
  });

  test("collect equals complete: the same message, finish reason, backend and usage", async () => {
    const client = connect();
    const request = { messages: chat("the same answer either way"), options: { tools: [functionTool("lookup")] } };
    // The second answer of each pair: reasoning and two tool calls, streamed in fragments.
    const calls = [
      { name: "lookup", arguments: '{"q":"first"}' },
      { name: "lookup", arguments: '{"q":"second"}' },
    ];
    for (const fault of [{}, { reasoning: "let me see", tool_calls: calls }]) {
      await upstream.addFaults(fault, fault);
      const unary = await client.complete(request);
      const collected = await client.collect(request);
      assert.deepEqual(collected.message, unary.message);
      assert.equal(collected.finishReason, unary.finishReason);
      assert.equal(collected.backend, unary.backend);
      assert.equal(collected.model, unary.model);
      assert.deepEqual(collected.usage, unary.usage);
      assert.deepEqual(
        collected.attempts.map((a) => [a.backend, a.outcome]),
        unary.attempts.map((a) => [a.backend, a.outcome]),
      );
    }
  });

  test("collect assembles reasoning and a tool call", async () => {
    // The fake numbers a call by the messages it was asked with (here a system and a user message) and its place.
    await upstream.addFaults({ reasoning: "thinking it over", tool_call: { name: "lookup", arguments: '{"q":"x"}' } });
    const answer = await connect().collect({ messages: chat("use the tool") });
    assert.equal(answer.message?.reasoning, "thinking it over");
    // As the generated decoder makes a call: every field present, the signature unset (this upstream signs none).
    const call = { id: "call_2_1", function: { name: "lookup", arguments: '{"q":"x"}' }, signature: undefined };
    assert.deepEqual(answer.message?.toolCalls, [call]);
    assert.equal(answer.finishReason, FinishReason.FINISH_REASON_TOOL_CALLS);
  });

  test("collect rejects with an LLMRelayError", async () => {
    await upstream.addFaults({ status: 429, retry_after: 2 });
    const err = await mustFail(connect().collect({ messages: chat("too many") }), status.RESOURCE_EXHAUSTED);
    assert.equal(err.reason, "UPSTREAM_RATE_LIMITED");
  });
});

/** Mid-stream recovery: a gateway whose "ollama" backend falls back to "fallback", both on the fake upstream. */
describe("a stream cut midway, with a fallback backend", { concurrency: false }, () => {
  let twoBackends: Gateway;
  let itsUpstream: Upstream;
  // The first chat request (to "ollama") gets 3 SSE chunks (the role, "echo:", one word), then the cut.
  const cut = { stream_cut_after: 3 };
  const prompt = "tell me something long enough to be cut";

  before(async () => {
    twoBackends = await Gateway.start({ fallback: true });
    itsUpstream = twoBackends.upstream;
  });

  after(async () => {
    await twoBackends?.stop();
  });

  beforeEach(async () => {
    await upstream.clearFaults();
    await itsUpstream.clearFaults();
  });

  test("collect gives exactly the fallback's whole answer", async () => {
    await itsUpstream.addFaults(cut);
    const pieces: string[] = [];
    const restarts: StreamRestart[] = [];
    const answer = await connect(twoBackends.addr).collect(
      { messages: chat(prompt) },
      {
        onDelta: (chunk) => pieces.push(`${chunk.backend}:${chunk.delta?.content ?? ""}`),
        onRestart: (restart) => restarts.push(restart),
      },
    );
    assert.equal(answer.message?.content, `echo: ${prompt}`);
    assert.equal(answer.backend, "fallback");
    assert.equal(answer.model, "tiny");
    assert.equal(answer.finishReason, FinishReason.FINISH_REASON_STOP);
    assert.equal(answer.attempts[0]?.backend, "ollama");
    assert.equal(answer.attempts[0]?.outcome, AttemptOutcome.ATTEMPT_OUTCOME_INTERRUPTED);
    assert.equal(answer.attempts.at(-1)?.backend, "fallback");
    assert.equal(answer.attempts.at(-1)?.outcome, AttemptOutcome.ATTEMPT_OUTCOME_SUCCEEDED);
    assert.ok(answer.usage !== undefined, "no usage");
    assert.ok(answer.usage.totalTokens > 0);
    // The final usage covers the broken attempt too.
    assert.ok(answer.usage.totalTokens > (restarts[0]?.usage?.totalTokens ?? 0), JSON.stringify(answer.usage));
    assert.equal(restarts.length, 1);
    assert.equal(restarts[0]!.backend, "ollama");
    // onDelta saw the broken attempt's pieces first, then the whole answer of the fallback.
    assert.ok(pieces[0]?.startsWith("ollama:"), JSON.stringify(pieces));
    assert.equal(
      pieces
        .filter((p) => p.startsWith("fallback:"))
        .map((p) => p.slice("fallback:".length))
        .join(""),
      `echo: ${prompt}`,
    );
  });

  test("collect asks for restarts when onInterrupt is UNSPECIFIED, as fromPartial() fills it in", async () => {
    await itsUpstream.addFaults(cut);
    const request = StreamCompleteRequest.fromPartial({ messages: chat(prompt) });
    assert.equal(request.onInterrupt, InterruptPolicy.INTERRUPT_POLICY_UNSPECIFIED);
    const answer = await connect(twoBackends.addr).collect(request);
    assert.equal(answer.message?.content, `echo: ${prompt}`);
    assert.equal(answer.backend, "fallback");
    assert.equal(answer.attempts[0]?.outcome, AttemptOutcome.ATTEMPT_OUTCOME_INTERRUPTED);
  });

  test("the raw stream with RESTART yields exactly one restart marker, and the whole answer after it", async () => {
    await itsUpstream.addFaults(cut);
    const request = { messages: chat(prompt), onInterrupt: InterruptPolicy.INTERRUPT_POLICY_RESTART };
    const chunks = await collect(connect(twoBackends.addr), request);
    const markers = chunks.filter(isRestart);
    assert.equal(markers.length, 1, JSON.stringify(chunks));
    const at = chunks.indexOf(markers[0]!);
    assert.ok(at > 0, "the marker comes after the first deltas");
    const marker = markers[0]!;
    assert.equal(marker.restart.backend, "ollama");
    assert.equal(marker.restart.attempts.at(-1)?.outcome, AttemptOutcome.ATTEMPT_OUTCOME_INTERRUPTED);
    assert.equal(marker.delta, undefined, "the marker carries only restart");
    assert.equal(marker.finishReason, FinishReason.FINISH_REASON_UNSPECIFIED);
    assert.ok(chunks.slice(0, at).every((c) => c.backend === "ollama"));
    const rest = chunks.slice(at + 1);
    assert.ok(rest.every((c) => c.backend === "fallback"));
    assert.equal(rest.map((c) => c.delta?.content ?? "").join(""), `echo: ${prompt}`);
    assert.equal(rest.at(-1)?.finishReason, FinishReason.FINISH_REASON_STOP);
  });

  test("by default (ABORT) a cut stream still ends with ABORTED, STREAM_INTERRUPTED", async () => {
    await itsUpstream.addFaults(cut);
    let err = await mustFail(collect(connect(twoBackends.addr), { messages: chat(prompt) }), status.ABORTED);
    assert.equal(err.reason, "STREAM_INTERRUPTED");
    assert.equal(err.errorReason, ErrorReason.ERROR_REASON_STREAM_INTERRUPTED);
    // collect() asks for RESTART only when the request says nothing (on the one-backend gateway, whose "ollama"
    // circuit the cut above did not touch).
    await upstream.addFaults(cut);
    const abort = { messages: chat(prompt), onInterrupt: InterruptPolicy.INTERRUPT_POLICY_ABORT };
    err = await mustFail(connect().collect(abort), status.ABORTED);
    assert.equal(err.reason, "STREAM_INTERRUPTED");
  });
});

describe("a key's limits", { concurrency: false }, () => {
  const key = "llmr-node-quota-0123456789abcdefghi";
  let limited: Gateway;

  before(async () => {
    const sha256 = createHash("sha256").update(key).digest("hex");
    limited = await Gateway.start({
      configExtra: `auth:\n  keys:\n    - {name: limited, sha256: "${sha256}", limits: {tokens_per_minute: 1000}}\n`,
    });
  });

  after(async () => {
    await limited?.stop();
  });

  test("a request larger than the limit gets a QuotaFailure that says what to change", async () => {
    const client = connect(limited.addr, { metadata: { authorization: `Bearer ${key}` } });
    // max_tokens alone reserves more than the key may use in a minute: no wait would admit the request.
    const request = { messages: chat("too big"), options: { maxTokens: 5_000 } };
    const err = await mustFail(client.complete(request), status.RESOURCE_EXHAUSTED);
    assert.equal(err.reason, "TOKENS_PER_MINUTE_EXCEEDED");
    assert.equal(err.quotaFailure?.violations.length, 1);
    const [violation] = err.quotaViolations;
    assert.equal(violation?.subject, "key:limited");
    assert.match(violation?.description ?? "", /set max_tokens to at most \d+/);
    assert.equal(err.retryDelayMs, undefined, "a request that never fits has no RetryInfo");
  });
});

describe("a gateway whose message limit is raised", { concurrency: false }, () => {
  let large: Gateway;

  before(async () => {
    large = await Gateway.start({ maxMessageBytes: 20 * 1024 * 1024 });
  });

  after(async () => {
    await large?.stop();
  });

  test("an answer over gRPC's default receive limit reaches the client", async () => {
    // server.max_message_bytes raised (for large images) raises the answers sent: the client kept gRPC's default
    // receive limit (4 MiB), and an answer of 5 MB, billed, failed RESOURCE_EXHAUSTED in it.
    await large.upstream.addFaults({ huge_content: 5_000_000 });
    const answer = await connect(large.addr).complete({ messages: chat("hi") });
    assert.equal(answer.message?.content.length, 5_000_000);
  });
});

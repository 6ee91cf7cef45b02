/**
 * End-to-end tests: the real gateway in front of the fake OpenAI upstream, both subprocesses on loopback, called
 * through this package's Client.
 */
import assert from "node:assert/strict";
import { after, before, beforeEach, describe, test } from "node:test";

import { status } from "@grpc/grpc-js";

import {
  AttemptOutcome,
  CircuitState,
  Client,
  DOMAIN,
  ErrorReason,
  FinishReason,
  LLMRelayError,
  Role,
  parseError,
  system,
  user,
  type ClientOptions,
  type MessageInput,
  type StreamCompleteResponse,
  type StreamInput,
} from "../src";
import { Gateway, Upstream, deadAddr } from "./gateway";

let upstream: Upstream;
let gateway: Gateway;
const clients: Client[] = [];

function connect(addr: string = gateway.addr, options: ClientOptions = {}): Client {
  const client = new Client(addr, { insecure: true, timeoutMs: 30_000, ...options });
  clients.push(client);
  return client;
}

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
  upstream = await Upstream.start();
  gateway = await Gateway.start(`${upstream.url}/v1`);
});

after(async () => {
  for (const client of clients) {
    client.close();
  }
  await gateway?.stop();
  await upstream?.stop();
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

  test("a signal aborted before the call starts neither a unary call nor a stream", async () => {
    const controller = new AbortController();
    const reason = new Error("the agent gave up");
    controller.abort(reason);
    const client = connect();
    await assert.rejects(client.complete({ messages: chat("never sent") }, { signal: controller.signal }), reason);
    const chunks = client.stream({ messages: chat("never sent") }, { signal: controller.signal });
    await assert.rejects(chunks.next(), reason);
  });

  test("a backend at a dead port is UNAVAILABLE with BACKENDS_UNAVAILABLE", async () => {
    const dead = await Gateway.start(`http://${await deadAddr()}/v1`);
    try {
      const err = await mustFail(connect(dead.addr).complete({ messages: chat("anyone?") }), status.UNAVAILABLE);
      assert.equal(err.reason, "BACKENDS_UNAVAILABLE");
    } finally {
      await dead.stop();
    }
  });

  test("the caller is recorded in the usage ledger", async () => {
    const client = connect(gateway.addr, { caller: "node-e2e" });
    await client.complete({ messages: chat("count me") });
    const usage = await client.getUsage({ caller: "node-e2e" });
    assert.equal(usage.records.length, 1);
    assert.ok(usage.records[0]!.requests >= 1);
  });

  test("the gateway exits 0 on SIGTERM", async () => {
    const other = await Gateway.start(`${upstream.url}/v1`);
    assert.equal(await other.stop(), 0, other.log());
  });
});

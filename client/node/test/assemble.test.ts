/** Unit tests of StreamAssembler: folding stream messages into the answer, without a server. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  AttemptOutcome,
  CompleteResponse,
  FinishReason,
  Message,
  Role,
  StreamAssembler,
  StreamCompleteResponse,
  assemble,
  hasDelta,
  isRestart,
  type DeepPartial,
} from "../src";

const head = { id: "chatcmpl-2", backend: "fallback", model: "tiny" };

function chunk(partial: DeepPartial<StreamCompleteResponse>): StreamCompleteResponse {
  return StreamCompleteResponse.fromPartial(partial);
}

/** What the broken first attempt sent before its stream was cut. */
const broken = [
  chunk({ id: "chatcmpl-1", backend: "ollama", model: "big", delta: { content: "Some" } }),
  chunk({ id: "chatcmpl-1", backend: "ollama", model: "big", delta: { reasoning: "I think" } }),
  chunk({
    id: "chatcmpl-1",
    backend: "ollama",
    model: "big",
    delta: { content: " text", toolCalls: [{ index: 0, id: "call_old", name: "old", arguments: "{" }] },
  }),
];

const restart = chunk({
  restart: {
    reason: "the upstream closed the stream",
    backend: "ollama",
    attempts: [{ backend: "ollama", model: "big", outcome: AttemptOutcome.ATTEMPT_OUTCOME_INTERRUPTED }],
    usage: { promptTokens: 10, completionTokens: 3, totalTokens: 13, estimated: true },
  },
});

/** The second attempt: content and reasoning in pieces, two tool calls in interleaved fragments. */
const fresh = [
  chunk({ ...head, delta: { reasoning: "Let me" } }),
  chunk({ ...head, delta: { reasoning: " see." } }),
  chunk({ ...head, delta: { content: "Calling" } }),
  chunk({ ...head, delta: { content: " two tools." } }),
  chunk({ ...head, delta: { toolCalls: [{ index: 0, id: "call_a", name: "weather", arguments: "", signature: "sig_a" }] } }),
  chunk({ ...head, delta: { toolCalls: [{ index: 1, id: "call_b", name: "time", arguments: '{"tz":' }] } }),
  chunk({ ...head, delta: { toolCalls: [{ index: 0, arguments: '{"city":' }] } }),
  chunk({
    ...head,
    delta: {
      toolCalls: [
        { index: 1, arguments: '"UTC"}' },
        { index: 0, arguments: '"Paris"}' },
      ],
    },
  }),
];

const final = chunk({
  ...head,
  finishReason: FinishReason.FINISH_REASON_TOOL_CALLS,
  usage: { promptTokens: 20, completionTokens: 12, totalTokens: 32 },
  attempts: [
    { backend: "ollama", model: "big", outcome: AttemptOutcome.ATTEMPT_OUTCOME_INTERRUPTED },
    { backend: "fallback", model: "tiny", outcome: AttemptOutcome.ATTEMPT_OUTCOME_SUCCEEDED },
  ],
});

describe("StreamAssembler", () => {
  test("folds content, reasoning and interleaved tool call fragments", () => {
    const answer = assemble([...fresh, final]);
    // Built as the decoder builds a CompleteResponse (every optional field present), so that it equals complete()'s.
    assert.deepEqual(answer, CompleteResponse.fromPartial({
      id: "chatcmpl-2",
      backend: "fallback",
      model: "tiny",
      message: {
        role: Role.ROLE_ASSISTANT,
        content: "Calling two tools.",
        reasoning: "Let me see.",
        toolCalls: [
          { id: "call_a", function: { name: "weather", arguments: '{"city":"Paris"}' }, signature: "sig_a" },
          { id: "call_b", function: { name: "time", arguments: '{"tz":"UTC"}' } },
        ],
        parts: [],
      },
      finishReason: FinishReason.FINISH_REASON_TOOL_CALLS,
      usage: final.usage,
      attempts: final.attempts,
    }));
  });

  test("a restart marker discards everything before it", () => {
    const assembler = new StreamAssembler();
    for (const c of broken) {
      assembler.add(c);
    }
    assert.equal(assembler.result().message?.content, "Some text");
    assembler.add(restart);
    assert.deepEqual(assembler.restarts, [restart.restart]);
    const reset = assembler.result();
    assert.deepEqual(reset.message, Message.fromPartial({ role: Role.ROLE_ASSISTANT }));
    assert.equal(reset.backend, "");
    for (const c of [...fresh, final]) {
      assembler.add(c);
    }
    assert.deepEqual(assembler.result(), assemble([...fresh, final]));
    assert.deepEqual(assemble([...broken, restart, ...fresh, final]), assemble([...fresh, final]));
  });

  test("an answer without reasoning or tool calls has none", () => {
    const answer = assemble([
      chunk({ ...head, delta: { content: "" } }),
      chunk({ ...head, delta: { content: "echo:" } }),
      chunk({ ...head, delta: { content: " hi" } }),
      chunk({ ...head, finishReason: FinishReason.FINISH_REASON_STOP }),
    ]);
    assert.deepEqual(answer.message, Message.fromPartial({ role: Role.ROLE_ASSISTANT, content: "echo: hi" }));
    assert.equal(answer.finishReason, FinishReason.FINISH_REASON_STOP);
    assert.equal(answer.usage, undefined);
    assert.deepEqual(answer.attempts, []);
  });

  test("isRestart and hasDelta tell the messages apart", () => {
    assert.ok(isRestart(restart));
    assert.equal(restart.restart.backend, "ollama"); // narrowed: restart is defined
    assert.ok(!hasDelta(restart));
    for (const c of [...broken, ...fresh]) {
      assert.ok(!isRestart(c));
      assert.ok(hasDelta(c));
    }
    assert.ok(!isRestart(final));
    assert.ok(!hasDelta(final));
    assert.ok(!hasDelta(chunk({ ...head, delta: { content: "" } })));
  });
});

/**
 * The agent loop and the conversation, end to end: the real gateway in front of the fake upstream (tests/harness.py),
 * the upstream scripted to ask for tools and then to answer with their results.
 */
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { after, before, beforeEach, describe, test } from "node:test";

import {
  Agent,
  AttemptOutcome,
  ContextBudgetError,
  Client,
  Conversation,
  FinishReason,
  jsonSchema,
  LLMRelayError,
  StepLimitError,
  Role,
  s,
  system,
  tool,
  user,
  type CompleteResponse,
  type MessageInput,
} from "../src";
import { Gateway, type Upstream } from "./gateway";

let gateway: Gateway;
let upstream: Upstream;
let client: Client;

before(async () => {
  gateway = await Gateway.start();
  upstream = gateway.upstream;
  client = new Client(gateway.addr, { timeoutMs: 30_000 });
});

after(async () => {
  client?.close();
  await gateway?.stop();
});

/**
 * Resolves once `count` callers have arrived, so that tools which all wait on it finish only if they run at the same
 * time; rejects after a while, saying they ran one at a time.
 */
function barrier(count: number): () => Promise<void> {
  let arrived = 0;
  let open!: () => void;
  const opened = new Promise<void>((resolve) => (open = resolve));
  return async () => {
    arrived += 1;
    if (arrived === count) {
      open();
    }
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`only ${arrived} of ${count} tools ran at once`)), 10_000);
    });
    try {
      await Promise.race([opened, late]);
    } finally {
      clearTimeout(timer);
    }
  };
}

function weatherAndClock(together: () => Promise<void>) {
  const weather = tool({
    name: "get_weather",
    description: "The weather in a city now",
    parameters: s.object({ city: s.string().describe("The city, in English") }),
    run: async ({ city }) => {
      await together();
      return { city, sky: "clear", celsius: city === "Paris" ? 21 : 25 };
    },
  });
  const clock = tool({
    name: "get_time",
    description: "The local time in a city",
    parameters: s.object({ city: s.string() }),
    run: async ({ city }) => {
      await together();
      return `12:00 in ${city}`;
    },
  });
  return [weather, clock];
}

describe("the agent loop", { concurrency: false }, () => {
  beforeEach(async () => {
    await upstream.clearFaults();
  });

  test("runs two tools in parallel over several steps, and answers with both tools' results", async () => {
    await upstream.addFaults(
      {
        tool_calls: [
          { name: "get_weather", arguments: '{"city":"Paris"}' },
          { name: "get_time", arguments: '{"city":"Paris"}' },
        ],
      },
      { tool_calls: [{ name: "get_weather", arguments: '{"city":"Rome"}' }] },
      { echo_tools: true },
    );
    const before = await upstream.requestCount();
    // The first step's two tools finish only together; the second step's one alone.
    const rounds = [barrier(2), barrier(1)];
    let round = 0;
    const agent = new Agent(client, { tools: weatherAndClock(() => rounds[round]!()) });
    const steps: CompleteResponse[] = [];
    const result = await agent.run([system("Use the tools."), user("Weather and time in Paris, then Rome?")], {
      onStep: (answer) => {
        steps.push(answer);
        round += 1;
      },
    });

    assert.equal(result.steps, 3);
    assert.equal(steps.length, 3);
    assert.equal(await upstream.requestCount(), before + 3);
    assert.equal(result.answer.finishReason, FinishReason.FINISH_REASON_STOP);
    assert.equal(
      result.answer.message?.content,
      'tools: get_weather={"city":"Paris","sky":"clear","celsius":21}; get_time=12:00 in Paris; ' +
        'get_weather={"city":"Rome","sky":"clear","celsius":25}',
    );
    // Usage and attempts summed over the steps.
    const sum = (field: "promptTokens" | "completionTokens" | "totalTokens") =>
      steps.reduce((total, step) => total + (step.usage?.[field] ?? 0), 0);
    assert.ok(sum("totalTokens") > 0);
    assert.equal(result.usage.promptTokens, sum("promptTokens"));
    assert.equal(result.usage.completionTokens, sum("completionTokens"));
    assert.equal(result.usage.totalTokens, sum("totalTokens"));
    assert.equal(result.attempts.length, 3);
    assert.ok(result.attempts.every((a) => a.outcome === AttemptOutcome.ATTEMPT_OUTCOME_SUCCEEDED));
    // The conversation: the question, each answer, and the tool results after the answer that asked for them.
    assert.deepEqual(
      result.conversation.messages.map((m) => [m.role, m.toolCallId ?? m.toolCalls?.length ?? 0]),
      [
        [Role.ROLE_SYSTEM, 0],
        [Role.ROLE_USER, 0],
        [Role.ROLE_ASSISTANT, 2],
        [Role.ROLE_TOOL, "call_2_1"],
        [Role.ROLE_TOOL, "call_2_2"],
        [Role.ROLE_ASSISTANT, 1],
        [Role.ROLE_TOOL, "call_5_1"],
        [Role.ROLE_ASSISTANT, 0],
      ],
    );
    // The tools' definitions went with every request.
    const requests = JSON.parse(await upstream.requests()) as { tools?: { function: { name: string } }[] }[];
    for (const request of requests.slice(-3)) {
      assert.deepEqual(
        request.tools?.map((t) => t.function.name),
        ["get_weather", "get_time"],
      );
    }
  });

  test("streams each step's answer to onDelta as it comes", async () => {
    const calls = { tool_calls: [{ name: "get_time", arguments: '{"city":"Oslo"}' }] };
    await upstream.addFaults(calls, { echo_tools: true });
    const agent = new Agent(client, { tools: weatherAndClock(async () => {}) });
    const pieces: string[] = [];
    const steps: CompleteResponse[] = [];
    const result = await agent.run([user("Time in Oslo?")], {
      onDelta: (chunk) => pieces.push(chunk.delta?.content ?? ""),
      onStep: (answer) => steps.push(answer),
    });
    assert.equal(result.steps, 2);
    assert.equal(result.answer.message?.content, "tools: get_time=12:00 in Oslo");
    assert.deepEqual(steps[0]?.message?.toolCalls.map((call) => call.function?.name), ["get_time"]);
    // The fake upstream says "echo: <question>" beside its tool calls: both steps' content came through onDelta.
    assert.ok(pieces.length >= 2, JSON.stringify(pieces));
    assert.equal(pieces.join(""), steps.map((step) => step.message?.content).join(""));
  });

  test("a tool that throws, an unknown tool and arguments that are not JSON become tool results", async () => {
    await upstream.addFaults(
      {
        tool_calls: [
          { name: "explode", arguments: "{}" },
          { name: "no_such_tool", arguments: "{}" },
          { name: "get_weather", arguments: '{"city": "Par' },
        ],
      },
      { echo_tools: true },
    );
    const explode = tool({
      name: "explode",
      parameters: s.object({}),
      run: () => {
        throw new Error("the sensor is down");
      },
    });
    const agent = new Agent(client, { tools: [explode, ...weatherAndClock(async () => {})] });
    const result = await agent.run([user("Try everything")]);
    const parseError = (() => {
      try {
        JSON.parse('{"city": "Par');
      } catch (err) {
        return (err as Error).message;
      }
    })();
    assert.equal(
      result.answer.message?.content,
      "tools: explode=error: explode failed: the sensor is down; " +
        'no_such_tool=error: there is no tool named "no_such_tool"; the tools are: explode, get_weather, get_time; ' +
        `get_weather=error: the arguments of get_weather are not valid JSON (${parseError}); call it again with a ` +
        "JSON object",
    );
  });

  test("a tool result or error with a lone surrogate goes with U+FFFD in its place", async () => {
    await upstream.addFaults(
      { tool_calls: [{ name: "read_file", arguments: "{}" }, { name: "lookup", arguments: "{}" }] },
      { echo_tools: true },
    );
    const readFile = tool({ name: "read_file", parameters: s.object({}), run: () => "caf\uD800 cr\u00e8me" });
    const lookup = tool({
      name: "lookup",
      parameters: s.object({}),
      run: () => {
        throw new Error("no file na\uDC00ve.txt");
      },
    });
    const result = await new Agent(client, { tools: [readFile, lookup] }).run([user("what is on the menu?")]);
    assert.equal(
      result.answer.message?.content,
      "tools: read_file=caf\uFFFD cr\u00e8me; lookup=error: lookup failed: no file na\uFFFDve.txt",
    );
  });

  test("a tool result that JSON cannot write goes as an error that says so, not as a call never finished", async () => {
    await upstream.addFaults(
      { tool_calls: [{ name: "handler", arguments: "{}" }, { name: "count", arguments: "{}" }] },
      { echo_tools: true },
    );
    const handler = tool({ name: "handler", parameters: s.object({}), run: () => () => "a function" });
    const count = tool({ name: "count", parameters: s.object({}), run: () => ({ n: 10n }) });
    const bigintError = (() => {
      try {
        JSON.stringify({ n: 10n });
      } catch (err) {
        return (err as Error).message;
      }
    })();
    const result = await new Agent(client, { tools: [handler, count] }).run([user("call them")]);
    assert.equal(
      result.answer.message?.content,
      "tools: handler=error: the tool's result cannot be written as JSON (a function at result, which JSON has no form for); " +
        `count=error: the tool's result cannot be written as JSON (${bigintError})`,
    );
  });

  test("arguments that do not fit the tool's schema are an error result, and the tool does not run", async () => {
    await upstream.addFaults(
      {
        tool_calls: [
          { name: "add", arguments: "[1,2]" },
          { name: "add", arguments: '{"a":1}' },
          { name: "add", arguments: '{"a":1,"b":2,"c":3}' },
          { name: "add", arguments: '{"a":1,"b":"2"}' },
          { name: "get_weather", arguments: '{"city":123}' },
          { name: "search", arguments: '"Paris"' },
          { name: "search", arguments: '{"q":"Paris","page":2}' },
          { name: "add", arguments: '{"a":1,"b":2}' },
        ],
      },
      { echo_tools: true },
    );
    const ran: unknown[] = [];
    const add = tool({
      name: "add",
      parameters: s.object({ a: s.number(), b: s.number() }),
      run: (args) => {
        ran.push(args);
        return args.a + args.b;
      },
    });
    // A raw JSON Schema is the model's to follow: only "an object" is checked, so the unknown "page" goes through.
    const search = tool<{ q: string }>({
      name: "search",
      parameters: { type: "object", properties: { q: { type: "string" } }, required: ["q"] },
      run: (args) => {
        ran.push(args);
        return `found ${JSON.stringify(args)}`;
      },
    });
    const [weather] = weatherAndClock(async () => {});
    const result = await new Agent(client, { tools: [add, search, weather!] }).run([user("Add them")]);
    assert.equal(
      result.answer.message?.content,
      [
        'add=error: the arguments of "add" must be a JSON object, not an array',
        'add=error: invalid arguments for "add": the required property "b" is missing',
        'add=error: invalid arguments for "add": there is no property "c" (the properties are: a, b)',
        'add=error: invalid arguments for "add": b: expected a number, got a string',
        'get_weather=error: invalid arguments for "get_weather": city: expected a string, got a number',
        'search=error: the arguments of "search" must be a JSON object, not a string',
        'search=found {"q":"Paris","page":2}',
        "add=3",
      ]
        .join("; ")
        .replace(/^/, "tools: "),
    );
    assert.deepEqual(ran, [{ q: "Paris", page: 2 }, { a: 1, b: 2 }], "only the calls whose arguments fit ran");
  });

  test("a tool result JSON would write wrongly is an error result, and undefined is null", async () => {
    const results: [string, unknown][] = [
      ["nan", NaN],
      ["deep", { scores: [1, -Infinity] }],
      ["map", new Map([["a", 1]])],
      ["set", { tags: new Set(["x"]) }],
      ["nothing", undefined],
      ["empty", ""],
    ];
    await upstream.addFaults(
      { tool_calls: results.map(([name]) => ({ name, arguments: "{}" })) },
      { echo_tools: true },
    );
    const tools = results.map(([name, value]) => tool({ name, parameters: s.object({}), run: () => value }));
    const result = await new Agent(client, { tools }).run([user("call them")]);
    const unwritable = "error: the tool's result cannot be written as JSON";
    assert.equal(
      result.answer.message?.content,
      `tools: nan=${unwritable} (NaN at result: JSON has no NaN or Infinity); ` +
        `deep=${unwritable} (-Infinity at result.scores[1]: JSON has no NaN or Infinity); ` +
        `map=${unwritable} (a Map at result, which JSON.stringify writes as {}: return an object or an array); ` +
        `set=${unwritable} (a Set at result.tags, which JSON.stringify writes as {}: return an object or an array); ` +
        "nothing=null; empty=",
    );
  });

  test("stops at the step limit with a StepLimitError that holds what the run did, ready to go on", async () => {
    const again = (city: string) => ({ tool_calls: [{ name: "get_time", arguments: JSON.stringify({ city }) }] });
    await upstream.addFaults(again("Lima"), again("Quito"), { echo_tools: true });
    const before = await upstream.requestCount();
    const agent = new Agent(client, { tools: weatherAndClock(async () => {}), maxSteps: 2 });
    const conversation = new Conversation([user("Loop forever")]);
    await assert.rejects(agent.run(conversation), (err: unknown) => {
      assert.ok(err instanceof StepLimitError, String(err));
      assert.match(err.message, /still asked for tools \(get_time\) after 2 steps/);
      assert.equal(err.result.steps, 2);
      assert.equal(err.result.attempts.length, 2);
      assert.equal(err.result.answer.message?.toolCalls.length, 1);
      return true;
    });
    // As in the Python and Go SDKs: the last answer and its call's result too, so that the next run goes on.
    assert.deepEqual(
      conversation.messages.map((m) => [m.role, m.content]),
      [
        [Role.ROLE_USER, "Loop forever"],
        [Role.ROLE_ASSISTANT, "echo: Loop forever"],
        [Role.ROLE_TOOL, "12:00 in Lima"],
        [Role.ROLE_ASSISTANT, "echo: Loop forever"],
        [Role.ROLE_TOOL, "12:00 in Quito"],
      ],
    );
    assert.equal(await upstream.requestCount(), before + 2);
    const result = await agent.run(conversation);
    assert.equal(result.answer.message?.content, "tools: get_time=12:00 in Lima; get_time=12:00 in Quito");
  });

  test("a model call that fails after a step ends the run with its error, which holds the run so far", async () => {
    await upstream.addFaults(
      { tool_call: { name: "get_time", arguments: JSON.stringify({ city: "Lima" }) } },
      { status: 400, body: JSON.stringify({ error: { message: "no more of this", type: "invalid_request_error" } }) },
    );
    let ran = 0;
    const counted = tool({ name: "get_time", parameters: s.object({ city: s.string() }), run: () => `${++ran}` });
    const agent = new Agent(client, { tools: [counted] });
    const conversation = new Conversation([user("What time is it in Lima?")]);
    await assert.rejects(agent.run(conversation), (err: unknown) => {
      assert.ok(err instanceof LLMRelayError, String(err));
      assert.match(err.message, /no more of this/);
      assert.equal(err.result?.steps, 1);
      assert.equal(err.result?.answer.message?.toolCalls[0]?.function?.name, "get_time");
      assert.ok((err.result?.usage.totalTokens ?? 0) > 0, "the first step's usage");
      const called = err.result?.answer.message?.toolCalls[0];
      assert.deepEqual(err.result?.conversation.messages.at(-1), {
        role: Role.ROLE_TOOL,
        toolCallId: called?.id,
        name: "get_time",
        content: "1",
      });
      return true;
    });
    assert.equal(ran, 1, "the tool ran once; the run so far goes on without running it again");
    // A first step that fails has no run to hold.
    await upstream.addFaults({ status: 400 });
    await assert.rejects(agent.run([user("again")]), (err: unknown) => {
      assert.ok(err instanceof LLMRelayError && err.result === undefined, String(err));
      return true;
    });
  });

  test("an AbortSignal while tools run leaves every call answered, so the conversation goes on", async () => {
    const calls = [
      { name: "get_time", arguments: '{"city":"Oslo"}' },
      { name: "hang", arguments: "{}" },
    ];
    await upstream.addFaults({ tool_calls: calls }, { echo_tools: true });
    const controller = new AbortController();
    const reason = new Error("the user gave up");
    const hang = tool({
      name: "hang",
      parameters: s.object({}),
      run: () => {
        setTimeout(() => controller.abort(reason), 100);
        return new Promise(() => {}); // deaf to the signal: it never returns
      },
    });
    const agent = new Agent(client, { tools: [...weatherAndClock(async () => {}), hang] });
    const conversation = new Conversation([user("Time in Oslo, then hang")]);
    await assert.rejects(agent.run(conversation, { signal: controller.signal }), (err) => err === reason);
    assert.deepEqual(
      conversation.messages.map((m) => [m.role, m.toolCallId ?? m.toolCalls?.length ?? 0, m.content]),
      [
        [Role.ROLE_USER, 0, "Time in Oslo, then hang"],
        [Role.ROLE_ASSISTANT, 2, "echo: Time in Oslo, then hang"],
        [Role.ROLE_TOOL, "call_1_1", "12:00 in Oslo"],
        [Role.ROLE_TOOL, "call_1_2", "error: the run was cancelled before the tool finished"],
      ],
    );
    const result = await agent.run(conversation);
    assert.equal(
      result.answer.message?.content,
      "tools: get_time=12:00 in Oslo; hang=error: the run was cancelled before the tool finished",
    );
  });

  test("an AbortSignal stops the run while a tool runs, and the tool sees it", async () => {
    await upstream.addFaults({ tool_calls: [{ name: "wait", arguments: "{}" }] });
    const before = await upstream.requestCount();
    const controller = new AbortController();
    let toolSawAbort = false;
    const wait = tool({
      name: "wait",
      parameters: s.object({}),
      run: (_, { signal }) =>
        new Promise((resolve) => {
          signal?.addEventListener("abort", () => {
            toolSawAbort = true;
            resolve("aborted");
          });
          controller.abort(new Error("the user gave up"));
        }),
    });
    const agent = new Agent(client, { tools: [wait] });
    await assert.rejects(agent.run([user("Wait")], { signal: controller.signal }), /the user gave up/);
    assert.ok(toolSawAbort);
    assert.equal(await upstream.requestCount(), before + 1, "no step after the abort");
  });

  test("a tool that gives up when the signal aborts is answered that the run was cancelled", async () => {
    await upstream.addFaults({
      tool_calls: [
        { name: "slow", arguments: "{}" },
        { name: "eager", arguments: "{}" },
        { name: "polite", arguments: "{}" },
        { name: "get_time", arguments: '{"city":"Oslo"}' },
      ],
    });
    const controller = new AbortController();
    const reason = new Error("the user gave up");
    // Rejects with an AbortError ("This operation was aborted") once the signal aborts, as timers and fetch do.
    const slow = tool({
      name: "slow",
      parameters: s.object({}),
      run: async (_, { signal }) => {
        setTimeout(() => controller.abort(reason), 100);
        await sleep(30_000, undefined, { signal });
        return "woke up";
      },
    });
    // Rejects at once in its own listener, which runs before the agent's.
    const eager = tool({
      name: "eager",
      parameters: s.object({}),
      run: (_, { signal }) =>
        new Promise((_, reject) =>
          signal?.addEventListener("abort", () => reject(new Error("This operation was aborted"))),
        ),
    });
    // Returns what it has once the signal aborts: still not a finished call.
    const polite = tool({
      name: "polite",
      parameters: s.object({}),
      run: (_, { signal }) => new Promise((resolve) => signal?.addEventListener("abort", () => resolve("partial"))),
    });
    const agent = new Agent(client, { tools: [slow, eager, polite, ...weatherAndClock(async () => {})] });
    const conversation = new Conversation([user("Sleep")]);
    await assert.rejects(agent.run(conversation, { signal: controller.signal }), (err) => err === reason);
    assert.deepEqual(
      conversation.messages.filter((m) => m.role === Role.ROLE_TOOL).map((m) => [m.name, m.content]),
      [
        ["slow", "error: the run was cancelled before the tool finished"],
        ["eager", "error: the run was cancelled before the tool finished"],
        ["polite", "error: the run was cancelled before the tool finished"],
        ["get_time", "12:00 in Oslo"],
      ],
    );
  });

  for (const streamed of [false, true]) {
    test(`an AbortSignal during a model call rejects the run with its reason${streamed ? " (onDelta)" : ""}`, async () => {
      // The call failed CANCELLED, and the run rejected with that rather than the reason its documentation promises.
      await upstream.addFaults({ stall_s: 5 });
      const agent = new Agent(client, { tools: [] });
      const reason = new Error("the user gave up mid-call");
      const controller = new AbortController();
      setTimeout(() => controller.abort(reason), 300);
      const options = streamed ? { signal: controller.signal, onDelta: () => {} } : { signal: controller.signal };
      await assert.rejects(agent.run([user("slow")], options), (err) => err === reason);
    });
  }
});

describe("the agent loop's toolTimeoutMs", { concurrency: false }, () => {
  beforeEach(async () => {
    await upstream.clearFaults();
  });

  test("bounds each step's tools: one still running is answered that it did not finish, and the run goes on", async () => {
    const step = (...names: string[]) => ({ tool_calls: names.map((name) => ({ name, arguments: "{}" })) });
    await upstream.addFaults(step("nap"), step("deaf", "polite", "nap"), { echo_tools: true });
    const before = await upstream.requestCount();
    // Within the bound in each step, not in both together: the bound is each step's, from its start.
    const nap = tool({
      name: "nap",
      parameters: s.object({}),
      run: async (_, { signal }) => {
        await sleep(800, undefined, { signal });
        return "rested";
      },
    });
    // Deaf to the signal: it returns only long after the bound, and what it returns then is dropped.
    let deafReturned = false;
    let deafDone: Promise<void> | undefined;
    const deaf = tool({
      name: "deaf",
      parameters: s.object({}),
      run: async () => {
        deafDone = sleep(3_000).then(() => {
          deafReturned = true;
        });
        await deafDone;
        return "too late";
      },
    });
    // Honours the signal: it stops once the bound passes, rejecting with the signal's reason.
    let politeSaw: unknown;
    const polite = tool({
      name: "polite",
      parameters: s.object({}),
      run: async (_, { signal }) => {
        try {
          await sleep(30_000, undefined, { signal });
        } catch (err) {
          politeSaw = signal?.aborted ? signal.reason : `not aborted: ${String(err)}`;
          throw err;
        }
        return "woke up";
      },
    });
    const agent = new Agent(client, { tools: [nap, deaf, polite], toolTimeoutMs: 1_500 });
    const started = Date.now();
    const result = await agent.run([user("Nap, then everything")]); // no signal of its own: the bound gives one
    const took = Date.now() - started;

    const unfinished = "error: the tool did not finish within 1.5 s";
    assert.equal(result.steps, 3);
    assert.equal(await upstream.requestCount(), before + 3, "the run went on to the final answer");
    assert.equal(result.answer.finishReason, FinishReason.FINISH_REASON_STOP);
    assert.equal(
      result.answer.message?.content,
      `tools: nap=rested; deaf=${unfinished}; polite=${unfinished}; nap=rested`,
    );
    assert.ok(!deafReturned, `the run waited ${took} ms, past the bound, for the deaf tool`);
    assert.ok(politeSaw instanceof DOMException, String(politeSaw));
    assert.equal(politeSaw.name, "TimeoutError");
    // The deaf tool's late result changes nothing.
    await deafDone;
    assert.deepEqual(
      result.conversation.messages.filter((m) => m.role === Role.ROLE_TOOL).map((m) => [m.name, m.content]),
      [
        ["nap", "rested"],
        ["deaf", unfinished],
        ["polite", unfinished],
        ["nap", "rested"],
      ],
    );
  });

  test("the run's AbortSignal still cancels the run and reaches the tools, with its reason", async () => {
    await upstream.addFaults({ tool_calls: [{ name: "wait", arguments: "{}" }, { name: "hang", arguments: "{}" }] });
    const before = await upstream.requestCount();
    const controller = new AbortController();
    const reason = new Error("the user gave up");
    let waitSaw: unknown;
    const wait = tool({
      name: "wait",
      parameters: s.object({}),
      run: (_, { signal }) =>
        new Promise((resolve) => {
          signal?.addEventListener("abort", () => {
            waitSaw = signal.reason;
            resolve("aborted");
          });
          setTimeout(() => controller.abort(reason), 100);
        }),
    });
    const hang = tool({ name: "hang", parameters: s.object({}), run: () => new Promise(() => {}) });
    const agent = new Agent(client, { tools: [wait, hang], toolTimeoutMs: 20_000 });
    const conversation = new Conversation([user("Wait")]);
    await assert.rejects(agent.run(conversation, { signal: controller.signal }), (err) => err === reason);
    assert.equal(waitSaw, reason);
    assert.equal(await upstream.requestCount(), before + 1, "no step after the abort");
    assert.deepEqual(
      conversation.messages.filter((m) => m.role === Role.ROLE_TOOL).map((m) => [m.name, m.content]),
      [
        ["wait", "error: the run was cancelled before the tool finished"],
        ["hang", "error: the run was cancelled before the tool finished"],
      ],
    );
  });
});

/** exactModel: a gateway whose "ollama" backend falls back to "fallback", both on its own fake upstream. */
describe("the agent loop's exactModel, with a fallback backend", { concurrency: false }, () => {
  let twoBackends: Gateway;
  let itsUpstream: Upstream;
  let itsClient: Client;

  before(async () => {
    twoBackends = await Gateway.start({ fallback: true });
    itsUpstream = twoBackends.upstream;
    itsClient = new Client(twoBackends.addr, { timeoutMs: 30_000 });
  });

  after(async () => {
    itsClient?.close();
    await twoBackends?.stop();
  });

  beforeEach(async () => {
    await itsUpstream.clearFaults();
  });

  // The first step is answered by "ollama"; the second is rate limited there (429, which the client does not retry,
  // as it does UNAVAILABLE): "fallback" may answer it, or nobody.
  const failingSecondStep = () =>
    itsUpstream.addFaults(
      { tool_calls: [{ name: "get_time", arguments: '{"city":"Oslo"}' }] },
      { status: 429 },
      { echo_tools: true },
    );

  for (const streamed of [false, true]) {
    const how = streamed ? " (onDelta)" : "";
    test(`without it, a step that fails on its backend falls back to another${how}`, async () => {
      await failingSecondStep();
      const agent = new Agent(itsClient, { tools: weatherAndClock(async () => {}) });
      const result = await agent.run([user("Time in Oslo?")], streamed ? { onDelta: () => {} } : {});
      assert.equal(result.answer.message?.content, "tools: get_time=12:00 in Oslo");
      assert.equal(result.answer.backend, "fallback");
      assert.deepEqual(
        result.attempts.map((a) => a.backend),
        ["ollama", "ollama", "fallback"],
      );
    });

    test(`with it, every model call of the run asks for its model alone: no fallback${how}`, async () => {
      await failingSecondStep();
      const before = await itsUpstream.requestCount();
      const agent = new Agent(itsClient, { tools: weatherAndClock(async () => {}), exactModel: true });
      const conversation = new Conversation([user("Time in Oslo?")]);
      await assert.rejects(agent.run(conversation, streamed ? { onDelta: () => {} } : {}), (err: unknown) => {
        assert.ok(err instanceof LLMRelayError, String(err));
        assert.equal(err.codeName, "RESOURCE_EXHAUSTED", err.message);
        assert.deepEqual(
          err.attempts.map((a) => a.backend),
          ["ollama"],
          "the failed step tried its backend alone",
        );
        return true;
      });
      assert.equal(await itsUpstream.requestCount(), before + 2, "the first step, and the second's one attempt");
      assert.deepEqual(
        conversation.messages.map((m) => [m.role, m.content]),
        [
          [Role.ROLE_USER, "Time in Oslo?"],
          [Role.ROLE_ASSISTANT, "echo: Time in Oslo?"],
          [Role.ROLE_TOOL, "12:00 in Oslo"],
        ],
      );
    });
  }
});

describe("Conversation", { concurrency: false }, () => {
  beforeEach(async () => {
    await upstream.clearFaults();
  });

  const turns: MessageInput[][] = [
    [user("The first question, which is rather long and takes a good many tokens to say in full.")],
    [
      user("The second question, which asks for a tool."),
      { role: Role.ROLE_ASSISTANT, toolCalls: [{ id: "call_1", function: { name: "f", arguments: "{}" } }] },
      { role: Role.ROLE_TOOL, toolCallId: "call_1", content: "the tool's result" },
      { role: Role.ROLE_ASSISTANT, content: "The second answer." },
    ],
    [user("The last question.")],
  ];

  test("counts its tokens through CountTokens, and fit() drops the oldest turns to the budget", async () => {
    const everything = new Conversation([system("Be brief."), ...turns.flat()]);
    const all = await everything.countTokens(client);
    const lastTwo = await new Conversation([system("Be brief."), ...turns[1]!, ...turns[2]!]).countTokens(client);
    assert.ok(lastTwo < all, `${lastTwo} < ${all}`);

    const trimmed = new Conversation([system("Be brief."), ...turns.flat()], { budgetTokens: lastTwo });
    const fit = await trimmed.fit(client);
    assert.equal(fit.tokenCount, lastTwo);
    assert.deepEqual(fit.dropped, turns[0]);
    assert.deepEqual(trimmed.messages, [system("Be brief."), ...turns[1]!, ...turns[2]!]);

    // Within the budget, nothing goes.
    const roomy = new Conversation([system("Be brief."), ...turns.flat()], { budgetTokens: all });
    assert.deepEqual((await roomy.fit(client)).dropped, []);
  });

  test("fit() says when the system messages and the last turn alone are over the budget, and drops nothing", async () => {
    const tight = new Conversation([system("Be brief."), ...turns.flat()], { budgetTokens: 3 });
    await assert.rejects(tight.fit(client), (err: unknown) => {
      assert.ok(err instanceof ContextBudgetError, String(err));
      assert.equal(err.budgetTokens, 3);
      assert.ok(err.tokenCount > 3);
      assert.match(err.message, /over its budget of 3/);
      return true;
    });
    assert.deepEqual(tight.messages, [system("Be brief."), ...turns.flat()], "the history stays, for a larger budget");
  });

  test("an agent appends to the conversation it is given, trimmed to its budget before each step", async () => {
    const history = [system("Be brief."), ...turns[0]!, { role: Role.ROLE_ASSISTANT, content: "The first answer." }];
    const tools = weatherAndClock(async () => {});
    const countOptions = { tools: tools.map((t) => t.definition) };
    const whole = new Conversation([...history, user("Time in Oslo?")]);
    const lastTurn = await new Conversation([system("Be brief."), user("Time in Oslo?")]).countTokens(
      client,
      countOptions,
    );
    assert.ok(lastTurn < (await whole.countTokens(client, countOptions)));
    // Room for the last turn, the tools and the step's tool call and result, not for the first turn.
    const conversation = new Conversation([...history, user("Time in Oslo?")], { budgetTokens: lastTurn + 60 });
    await upstream.addFaults({ tool_calls: [{ name: "get_time", arguments: '{"city":"Oslo"}' }] }, { echo_tools: true });
    const result = await new Agent(client, { tools }).run(conversation);
    assert.equal(result.conversation, conversation);
    assert.equal(result.answer.message?.content, "tools: get_time=12:00 in Oslo");
    assert.deepEqual(
      conversation.messages.map((m) => m.role),
      [Role.ROLE_SYSTEM, Role.ROLE_USER, Role.ROLE_ASSISTANT, Role.ROLE_TOOL, Role.ROLE_ASSISTANT],
    );
    assert.equal(conversation.messages[1]?.content, "Time in Oslo?");
  });

  test("an agent counts with its own model when the conversation names none, else with the conversation's", async () => {
    // The real client, its CountTokens requests noted on the way.
    const counted: (string | undefined)[] = [];
    const noting = new Proxy(client, {
      get(target, key) {
        if (key === "countTokens") {
          return (request: { model?: string }, options?: object) => {
            counted.push(request.model);
            return target.countTokens(request, options);
          };
        }
        const value: unknown = Reflect.get(target, key);
        return typeof value === "function" ? value.bind(target) : value;
      },
    });
    const agent = new Agent(noting, { tools: [], model: "ollama/tiny" });
    const answered = await agent.run(new Conversation([user("Hello")], { budgetTokens: 10_000 }));
    assert.equal(answered.answer.model, "tiny");
    await agent.run(new Conversation([user("Hello")], { budgetTokens: 10_000, model: "tiny" }));
    await agent.run(new Conversation([user("Hello")], { budgetTokens: 10_000, model: "" }));
    assert.deepEqual(counted, ["ollama/tiny", "tiny", "ollama/tiny"]);
  });

  test("an agent counts the schema its answers must follow against the budget", async () => {
    const responseFormat = jsonSchema("forecast", { type: "object", properties: { summary: { type: "string" } } });
    const messages = [user("Weather in Oslo?")];
    const withSchema = await new Conversation(messages).countTokens(client, { model: "gpt-4o", responseFormat });
    const alone = await new Conversation(messages).countTokens(client, { model: "gpt-4o" });
    assert.ok(withSchema > alone, `${withSchema} tokens with the schema, ${alone} without`);
    // The chat alone fits the budget; with its schema it does not.
    const conversation = new Conversation(messages, { budgetTokens: withSchema - 1 });
    const agent = new Agent(client, { tools: [], model: "gpt-4o", options: { responseFormat } });
    await assert.rejects(agent.run(conversation), (err: unknown) => {
      assert.ok(err instanceof ContextBudgetError);
      assert.equal(err.tokenCount, withSchema);
      return true;
    });
  });

  test("an agent counts the definitions of the tools it sends against the budget", async () => {
    const dictionary = tool({
      name: "look_up",
      description: "Looks a word up in the dictionary and gives its meanings, with examples. ".repeat(10),
      parameters: s.object({ word: s.string() }),
      run: ({ word }) => `${word}: a word`,
    });
    const messages = [system("Be brief."), ...turns[0]!, { role: Role.ROLE_ASSISTANT, content: "The first answer." }];
    messages.push(user("What does 'ephemeral' mean?"));
    const lastTurn = [system("Be brief."), user("What does 'ephemeral' mean?")];
    const budgetTokens = await new Conversation(lastTurn).countTokens(client, { tools: [dictionary.definition] });
    // The messages alone fit; with the tool's definition only the last turn does.
    assert.ok((await new Conversation(messages).countTokens(client)) <= budgetTokens);
    const conversation = new Conversation(messages, { budgetTokens });
    const requestsBefore = await upstream.requestCount();
    await new Agent(client, { tools: [dictionary] }).run(conversation);
    const sent = JSON.parse(await upstream.requests()) as { messages: unknown[]; tools: unknown[] }[];
    assert.equal(sent.length, requestsBefore + 1);
    assert.deepEqual(
      sent.at(-1)!.messages.map((m) => (m as { content: string }).content),
      ["Be brief.", "What does 'ephemeral' mean?"],
      "the first turn dropped",
    );
    assert.equal(sent.at(-1)!.tools.length, 1);
  });
});

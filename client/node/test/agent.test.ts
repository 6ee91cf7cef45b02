/**
 * Unit tests of the agent helpers' pure parts, without a server: the schema builder, tool definitions, usage sums,
 * and the turns a conversation trims. The loop itself runs end to end in e2e.test.ts.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  Agent,
  Client,
  CompleteResponse,
  Role,
  addUsage,
  s,
  tool,
  user,
  type Infer,
  type MessageInput,
  type Usage,
} from "../src";
import { turnsOf } from "../src/conversation";

/** Fails to compile unless A and B are the same type. */
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
function typeIs<T extends true>(_: T): void {}

describe("the schema builder", () => {
  const weather = s.object({
    city: s.string().describe("The city, in English"),
    unit: s.enum(["celsius", "fahrenheit"]).optional(),
    days: s.array(s.integer()).optional(),
    detailed: s.boolean(),
  });

  test("gives the JSON Schema the model sees", () => {
    assert.deepEqual(weather.json, {
      type: "object",
      properties: {
        city: { type: "string", description: "The city, in English" },
        unit: { type: "string", enum: ["celsius", "fahrenheit"] },
        days: { type: "array", items: { type: "integer" } },
        detailed: { type: "boolean" },
      },
      required: ["city", "detailed"],
      additionalProperties: false,
    });
  });

  test("infers the arguments' type", () => {
    type Expected = { city: string; unit?: "celsius" | "fahrenheit"; days?: number[]; detailed: boolean };
    typeIs<Same<Infer<typeof weather>, Expected>>(true);
  });

  test("describe and optional leave the schema they start from as it was", () => {
    const base = s.number();
    const described = base.describe("a ratio").optional();
    assert.deepEqual(base.json, { type: "number" });
    assert.equal(base.isOptional, false);
    assert.deepEqual(described.json, { type: "number", description: "a ratio" });
    assert.equal(described.isOptional, true);
  });
});

describe("tool", () => {
  test("sends a builder's schema as JSON text, with the description", () => {
    const weather = tool({
      name: "get_weather",
      description: "The weather in a city now",
      parameters: s.object({ city: s.string() }),
      run: ({ city }) => `sunny in ${city}`,
    });
    assert.deepEqual(weather.definition, {
      function: {
        name: "get_weather",
        description: "The weather in a city now",
        strict: undefined,
        parametersJson: '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"],' +
          '"additionalProperties":false}',
      },
    });
  });

  test("takes a JSON Schema as an object or as text", () => {
    const schema = { type: "object", properties: { q: { type: "string" } } };
    const fromObject = tool<{ q: string }>({ name: "search", parameters: schema, run: ({ q }) => q });
    const fromText = tool({ name: "search", parameters: JSON.stringify(schema), run: () => "" });
    assert.equal(fromObject.definition.function?.parametersJson, JSON.stringify(schema));
    assert.equal(fromText.definition.function?.parametersJson, JSON.stringify(schema));
  });

  test("an Agent refuses two tools of one name, and a step limit below 1", () => {
    const client = new Client("127.0.0.1:1");
    const echo = tool({ name: "echo", parameters: s.object({}), run: () => "" });
    assert.throws(() => new Agent(client, { tools: [echo, echo] }), /two tools are named "echo"/);
    assert.throws(() => new Agent(client, { tools: [echo], maxSteps: 0 }), /maxSteps is 0/);
    client.close();
  });
});

describe("a tool that throws what is not an Error", () => {
  /** A client whose model asks for the calls once, then answers: the run is the Agent's alone, without a server. */
  function scriptedClient(calls: { name: string }[]): Client {
    const answers = [
      CompleteResponse.fromPartial({
        message: {
          role: Role.ROLE_ASSISTANT,
          toolCalls: calls.map(({ name }, i) => ({ id: `call_${i}`, function: { name, arguments: "{}" } })),
        },
      }),
      CompleteResponse.fromPartial({ message: { role: Role.ROLE_ASSISTANT, content: "done" } }),
    ];
    return { complete: async () => answers.shift()! } as unknown as Client;
  }

  test("is answered with an error result that says what it threw, and the step's other results are kept", async () => {
    const bare: Record<string, unknown> = Object.create(null); // String() of it throws: no toString
    bare.detail = "the disk is full";
    const cyclic: Record<string, unknown> = Object.create(null); // neither String() nor JSON takes it
    cyclic.self = cyclic;
    const throwing = (name: string, thrown: unknown) =>
      tool({
        name,
        parameters: s.object({}),
        run: () => {
          throw thrown;
        },
      });
    const tools = [
      throwing("bare", bare),
      throwing("plain", { code: 7, reason: "quota" }),
      throwing("cyclic", cyclic),
      tool({ name: "fine", parameters: s.object({}), run: () => "ok" }),
    ];
    const agent = new Agent(scriptedClient(tools), { tools });
    const result = await agent.run([user("go")]);
    assert.equal(result.steps, 2);
    const results = result.conversation.messages.filter((m) => m.role === Role.ROLE_TOOL);
    assert.deepEqual(
      results.map((m) => [m.toolCallId, m.content]),
      [
        ["call_0", 'error: bare failed: {"detail":"the disk is full"}'],
        ["call_1", 'error: plain failed: {"code":7,"reason":"quota"}'],
        ["call_2", "error: cyclic failed: [object Object]"],
        ["call_3", "ok"],
      ],
    );
  });
});

describe("addUsage", () => {
  const usage = (promptTokens: number, completionTokens: number, extra: Partial<Usage> = {}): Usage => ({
    promptTokens,
    completionTokens,
    totalTokens: promptTokens + completionTokens,
    estimated: false,
    cost: undefined,
    ...extra,
  });

  test("adds the counts, and is estimated when either part is", () => {
    const sum = addUsage(usage(10, 2), usage(20, 3, { estimated: true, reasoningTokens: 4 }));
    assert.deepEqual(sum, {
      promptTokens: 30,
      completionTokens: 5,
      totalTokens: 35,
      estimated: true,
      reasoningTokens: 4,
      cachedPromptTokens: undefined,
      cost: undefined,
    });
  });

  test("adds costs, keeping their flags", () => {
    const a = usage(1, 1, { cost: { usdMicros: 5, estimated: false, priceUnknown: false } });
    const b = usage(1, 1, { cost: { usdMicros: 7, estimated: true, priceUnknown: false } });
    assert.deepEqual(addUsage(a, b).cost, { usdMicros: 12, estimated: true, priceUnknown: false });
    assert.deepEqual(addUsage(a, usage(1, 1)).cost, a.cost);
  });

  test("an answer without usage adds nothing", () => {
    const a = usage(3, 4);
    assert.equal(addUsage(a, undefined), a);
  });
});

describe("the turns a conversation trims", () => {
  const sys: MessageInput = { role: Role.ROLE_SYSTEM, content: "Be brief." };
  const answer: MessageInput = { role: Role.ROLE_ASSISTANT, content: "ok" };
  const callsTool: MessageInput = {
    role: Role.ROLE_ASSISTANT,
    toolCalls: [{ id: "call_1", function: { name: "f", arguments: "{}" } }],
  };
  const result: MessageInput = { role: Role.ROLE_TOOL, toolCallId: "call_1", content: "42" };

  test("start at each user message and keep a tool call with its result", () => {
    const messages = [sys, user("a"), answer, user("b"), callsTool, result, answer, user("c")];
    assert.deepEqual(turnsOf(messages), [
      { start: 1, end: 3 },
      { start: 3, end: 7 },
      { start: 7, end: 8 },
    ]);
  });

  test("the messages before the first user message, system messages aside, make a turn", () => {
    assert.deepEqual(turnsOf([sys, answer, user("a")]), [
      { start: 1, end: 2 },
      { start: 2, end: 3 },
    ]);
    assert.deepEqual(turnsOf([sys]), []);
  });
});

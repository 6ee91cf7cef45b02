/**
 * Unit tests of the agent helpers' pure parts, without a server: the schema builder and its check, tool definitions,
 * tool results, usage sums, and the turns a conversation trims. The loop itself runs end to end in e2e.test.ts.
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
import { MAX_TOOL_TIMEOUT_MS } from "../src";
import { formatG } from "../src/agent";
import { Conversation, turnsOf } from "../src/conversation";

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

describe("the schema builder's check", () => {
  const order = s.object({
    city: s.string(),
    unit: s.enum(["celsius", "fahrenheit"]).optional(),
    days: s.array(s.integer()).optional(),
    detailed: s.boolean(),
    ratio: s.number().describe("a ratio").optional(),
    address: s.object({ street: s.string(), "zip code": s.integer().optional() }).optional(),
  });

  test("passes values that fit, optional properties left out or there", () => {
    assert.deepEqual(order.check({ city: "Paris", detailed: false }), []);
    const full = {
      city: "Paris",
      unit: "celsius",
      days: [1, 2, -3],
      detailed: true,
      ratio: 0.5,
      address: { street: "Rue de Rivoli", "zip code": 75001 },
    };
    assert.deepEqual(order.check(full), []);
    assert.deepEqual(s.object({}).check({}), []);
  });

  test("names each part that does not fit, with its path", () => {
    assert.deepEqual(
      order.check({
        city: 123,
        unit: "kelvin",
        days: [1, 1.5, "2"],
        detailed: "yes",
        ratio: null,
        address: { "zip code": 7.5, floor: 2 },
        extra: true,
      }),
      [
        "city: expected a string, got a number",
        'unit: expected one of "celsius", "fahrenheit", got "kelvin"',
        "days[1]: expected an integer, got 1.5",
        "days[2]: expected an integer, got a string",
        "detailed: expected a boolean, got a string",
        "ratio: expected a number, got null",
        'address: the required property "street" is missing',
        'address."zip code": expected an integer, got 7.5',
        'address: there is no property "floor" (the properties are: street, zip code)',
        'there is no property "extra" (the properties are: city, unit, days, detailed, ratio, address)',
      ],
    );
  });

  test("refuses what is not an object where one is, and says what it got", () => {
    assert.deepEqual(order.check([1, 2]), ["expected an object, got an array"]);
    assert.deepEqual(order.check(null), ["expected an object, got null"]);
    assert.deepEqual(order.check({ city: "Oslo", detailed: true, address: "Main St" }), [
      "address: expected an object, got a string",
    ]);
    assert.deepEqual(order.check({ city: "Oslo", detailed: true, days: { 0: 1 } }), [
      "days: expected an array, got an object",
    ]);
    assert.deepEqual(s.object({}).check({ a: 1 }), ['there is no property "a" (it takes none)']);
  });

  test("lists every missing required property, and counts only own properties", () => {
    assert.deepEqual(order.check({}), [
      'the required property "city" is missing',
      'the required property "detailed" is missing',
    ]);
    // JSON.parse makes "__proto__" an own property, and "toString" is no property of the arguments.
    assert.deepEqual(s.object({ toString: s.string().optional() }).check(JSON.parse('{"__proto__":1}')), [
      'there is no property "__proto__" (the properties are: toString)',
    ]);
  });

  test("refuses a number JSON.parse read as Infinity", () => {
    assert.deepEqual(s.number().check(JSON.parse("1e400"), "x"), ["x: expected a number, got Infinity"]);
  });

  test("refuses an integer past 2^53, which JSON.parse has already rounded, and takes the largest it holds", () => {
    // A 64-bit id: the tool would have acted on 9007199254740992.
    assert.deepEqual(s.object({ orderId: s.integer() }).check(JSON.parse('{"orderId": 9007199254740993}')), [
      "orderId: expected an integer a number holds exactly (at most 2^53 - 1 in size), got about 9.007e+15",
    ]);
    assert.deepEqual(s.integer().check(-(2 ** 60), "n"), [
      "n: expected an integer a number holds exactly (at most 2^53 - 1 in size), got about -1.153e+18",
    ]);
    assert.deepEqual(s.integer().check(Number.MAX_SAFE_INTEGER), []);
    assert.deepEqual(s.integer().check(Number.MIN_SAFE_INTEGER), []);
  });

  test("describe and optional keep the check", () => {
    assert.deepEqual(s.integer().describe("a count").optional().check(2.5, "n"), ["n: expected an integer, got 2.5"]);
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

  test("an Agent refuses a toolTimeoutMs that is not a number of milliseconds above 0 (and within setTimeout's)", () => {
    const client = new Client("127.0.0.1:1");
    const echo = tool({ name: "echo", parameters: s.object({}), run: () => "" });
    const refused = [0, -1, NaN, Infinity, -Infinity, MAX_TOOL_TIMEOUT_MS + 1, "500" as unknown as number];
    for (const toolTimeoutMs of refused) {
      assert.throws(
        () => new Agent(client, { tools: [echo], toolTimeoutMs }),
        (err: unknown) => {
          assert.ok(err instanceof RangeError, String(err));
          assert.equal(
            err.message,
            `toolTimeoutMs is ${String(toolTimeoutMs)}: give a number of milliseconds > 0 and at most ` +
              `${MAX_TOOL_TIMEOUT_MS}, or leave it unset for no bound`,
          );
          return true;
        },
      );
    }
    for (const toolTimeoutMs of [undefined, 0.5, 1, 500, MAX_TOOL_TIMEOUT_MS]) {
      new Agent(client, { tools: [echo], toolTimeoutMs });
    }
    client.close();
  });

  test("a tool still running at toolTimeoutMs is answered so, in the Python SDK's words, and the run goes on", async () => {
    // No server: the model asks for the calls once, then answers; the run is given no signal of its own.
    let sawAborted: unknown;
    const tools = [
      tool({ name: "deaf", parameters: s.object({}), run: () => new Promise(() => {}) }),
      tool({
        name: "polite",
        parameters: s.object({}),
        run: (_, { signal }) =>
          new Promise((resolve) =>
            signal?.addEventListener("abort", () => {
              sawAborted = signal.reason;
              resolve("what I had"); // late: discarded
            }),
          ),
      }),
      tool({ name: "quick", parameters: s.object({}), run: () => "ok" }),
    ];
    const agent = new Agent(scriptedClient(tools), { tools, toolTimeoutMs: 50 });
    const result = await agent.run([user("go")]);
    assert.equal(result.steps, 2);
    assert.equal(result.answer.message?.content, "done");
    assert.deepEqual(
      result.conversation.messages.filter((m) => m.role === Role.ROLE_TOOL).map((m) => [m.toolCallId, m.content]),
      [
        ["call_0", "error: the tool did not finish within 0.05 s"],
        ["call_1", "error: the tool did not finish within 0.05 s"],
        ["call_2", "ok"],
      ],
    );
    assert.ok(sawAborted instanceof DOMException, String(sawAborted));
    assert.equal(sawAborted.name, "TimeoutError");
  });

  test("a call of a tool an Agent without tools lacks is answered that there are none", async () => {
    // An empty list read as cut off ("the tools are: "), where the Python and Go SDKs say "none".
    const result = await new Agent(scriptedClient([{ name: "f" }]), { tools: [] }).run([user("go")]);
    assert.deepEqual(
      result.conversation.messages.filter((m) => m.role === Role.ROLE_TOOL).map((m) => m.content),
      ['error: there is no tool named "f"; the tools are: none'],
    );
  });
});

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

describe("formatG", () => {
  test("writes seconds as Python's %g does", () => {
    // Each as Python writes "%g" % value.
    const cases: [number, string][] = [
      [0.5, "0.5"],
      [2, "2"],
      [1.5, "1.5"],
      [0.001, "0.001"],
      [0.0001, "0.0001"],
      [0.00001, "1e-05"],
      [0.0005, "0.0005"],
      [1e-7, "1e-07"],
      [100, "100"],
      [123456, "123456"],
      [1234567, "1.23457e+06"],
      [0.3333333333, "0.333333"],
      [2147483.647, "2.14748e+06"],
      [1e21, "1e+21"],
    ];
    assert.deepEqual(
      cases.map(([value]) => [value, formatG(value)]),
      cases,
    );
  });
});

describe("a tool that throws what is not an Error", () => {
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

describe("a tool's result", () => {
  test("goes as JSON, or as an error that says why JSON cannot hold it, wherever in it the trouble is", async () => {
    const cyclic: Record<string, unknown> = { name: "loop" };
    cyclic.self = cyclic;
    const cycleError = (() => {
      try {
        JSON.stringify(cyclic);
      } catch (err) {
        return (err as Error).message;
      }
    })();
    const results: [string, unknown][] = [
      ["nothing", undefined],
      ["nil", null],
      ["date", { at: new Date(0) }],
      ["cyclic", cyclic],
      ["typed", { samples: new Float64Array([1, NaN]) }],
      ["boxed", [new Number(Infinity)]],
      ["to_json", { toJSON: () => ({ ratio: NaN }) }],
      ["symbol", Symbol("s")],
      // Left out of an object and null in an array by JSON.stringify: the model read a result with less in it.
      ["nested", { total: 3, format: () => "3" }],
      ["listed", [1, Symbol("s")]],
    ];
    const tools = results.map(([name, value]) => tool({ name, parameters: s.object({}), run: () => value }));
    const result = await new Agent(scriptedClient(results.map(([name]) => ({ name }))), { tools }).run([user("go")]);
    const unwritable = "error: the tool's result cannot be written as JSON";
    assert.deepEqual(
      result.conversation.messages.filter((m) => m.role === Role.ROLE_TOOL).map((m) => [m.name, m.content]),
      [
        ["nothing", "null"],
        ["nil", "null"],
        ["date", '{"at":"1970-01-01T00:00:00.000Z"}'],
        ["cyclic", `${unwritable} (${cycleError})`],
        [
          "typed",
          `${unwritable} (a Float64Array at result.samples, which JSON.stringify writes as an object of its indexes: ` +
            "return an array (Array.from))",
        ],
        ["boxed", `${unwritable} (Infinity at result[0]: JSON has no NaN or Infinity)`],
        ["to_json", `${unwritable} (NaN at result.ratio: JSON has no NaN or Infinity)`],
        ["symbol", `${unwritable} (a symbol at result, which JSON has no form for)`],
        ["nested", `${unwritable} (a function at result.format, which JSON has no form for)`],
        ["listed", `${unwritable} (a symbol at result[1], which JSON has no form for)`],
      ],
    );
  });

  test("is refused where JSON.stringify would write an object of a class as {} or as indexes (toJSON aside)", async () => {
    class Point {
      constructor(
        readonly x: number,
        readonly y: number,
      ) {}
      get norm(): number {
        return Math.hypot(this.x, this.y);
      }
    }
    const bare: Record<string, unknown> = Object.create(null);
    bare.ok = true;
    class Row extends Array<number> {}
    const results: [string, unknown][] = [
      // Written as {}, or as an object of indexes, by JSON.stringify: the model read a result unlike the tool's.
      ["error", { failure: new Error("the disk is full") }],
      ["regexp", /a+/],
      ["bytes", new Uint8Array([104, 105])],
      ["view", new DataView(new ArrayBuffer(2))],
      ["buffer", [new ArrayBuffer(2)]],
      ["empty", { at: new (class Hidden {})() }],
      // What JSON.stringify writes as it is: toJSON's result, an object without a prototype, an array of a subclass,
      // boxed primitives, a class's instance by its own fields (its getter left out, as ever).
      ["point", { at: new Point(3, 4) }],
      ["date", new Date(0)],
      ["dated", { toJSON: () => ({ at: new Date(0) }) }],
      ["bare", bare],
      ["row", Row.from([1, 2])],
      ["boxed", [new String("s"), new Boolean(true), new Number(2)]],
    ];
    const tools = results.map(([name, value]) => tool({ name, parameters: s.object({}), run: () => value }));
    const result = await new Agent(scriptedClient(results.map(([name]) => ({ name }))), { tools }).run([user("go")]);
    const unwritable = "error: the tool's result cannot be written as JSON";
    const fields =
      "which JSON.stringify writes as {}, what it holds being no field of its own: return an object or an array";
    assert.deepEqual(
      result.conversation.messages.filter((m) => m.role === Role.ROLE_TOOL).map((m) => [m.name, m.content]),
      [
        [
          "error",
          `${unwritable} (an Error at result.failure, which JSON.stringify writes without its message: throw it, ` +
            "or return its message)",
        ],
        ["regexp", `${unwritable} (a RegExp at result, ${fields})`],
        [
          "bytes",
          `${unwritable} (a Uint8Array at result, which JSON.stringify writes as an object of its indexes: return an ` +
            "array (Array.from))",
        ],
        ["view", `${unwritable} (a DataView at result, ${fields})`],
        ["buffer", `${unwritable} (an ArrayBuffer at result[0], ${fields})`],
        ["empty", `${unwritable} (a Hidden at result.at, ${fields})`],
        ["point", '{"at":{"x":3,"y":4}}'],
        ["date", '"1970-01-01T00:00:00.000Z"'],
        ["dated", '{"at":"1970-01-01T00:00:00.000Z"}'],
        ["bare", '{"ok":true}'],
        ["row", "[1,2]"],
        ["boxed", '["s",true,2]'],
      ],
    );
  });
});

describe("a Conversation's budget", () => {
  test("below 0 (or no number) is refused, as the Python SDK refuses it", () => {
    // A context window less maxTokens gone below 0: fit() dropped every turn but the last, then failed.
    for (const budgetTokens of [-1, -5000, NaN]) {
      assert.throws(() => new Conversation([user("hi")], { budgetTokens }), {
        name: "RangeError",
        message: `budgetTokens must be 0 or more, not ${budgetTokens}`,
      });
    }
    assert.equal(new Conversation([user("hi")], { budgetTokens: 0 }).options.budgetTokens, 0);
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
    const sum = addUsage(
      usage(10, 2, { cacheWritePromptTokens: 6 }),
      usage(20, 3, { estimated: true, reasoningTokens: 4, cacheWritePromptTokens: 5 }),
    );
    assert.deepEqual(sum, {
      promptTokens: 30,
      completionTokens: 5,
      totalTokens: 35,
      estimated: true,
      reasoningTokens: 4,
      cachedPromptTokens: undefined,
      cacheWritePromptTokens: 11,
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

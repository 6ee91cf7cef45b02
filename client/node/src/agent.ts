/**
 * The agent loop: tools the model may call (a function with its JSON Schema), and an Agent that calls the model,
 * runs the tool calls it asks for in parallel, appends their results, and calls again until the model answers
 * without tool calls or the step limit is reached.
 */
import {
  type Attempt,
  type CompleteResponse,
  type CompletionOptions,
  type DeepPartial,
  type ToolCall,
  type Usage,
} from "./gen/llmrelay/v1/llmrelay";
import { onAbort } from "./abort";
import type { CallOptions, Client, CollectOptions, MessageInput } from "./client";
import { functionTool, type ToolInput } from "./content";
import { ContextBudgetError, Conversation, toolMessage } from "./conversation";
import { LLMRelayError } from "./errors";
import { isSchema, type Schema } from "./schema";

/** What a tool's function gets beside its arguments. */
export interface ToolContext {
  /** The call the model made (its id, name and arguments as JSON text). */
  call: ToolCall;
  /**
   * Aborted when the run is, or when the agent's toolTimeoutMs passes (its reason then a DOMException named
   * "TimeoutError"): a tool that waits on I/O should pass it on. Undefined for a run given no signal by an agent
   * without toolTimeoutMs.
   */
  signal: AbortSignal | undefined;
}

/** A function the model may call. */
export interface AgentTool<Args = unknown> {
  readonly name: string;
  /** What the model is told the tool does. */
  readonly description: string | undefined;
  /** The tool's definition in a request. */
  readonly definition: ToolInput;
  /**
   * What is wrong with the model's arguments (a JSON object, parsed), each problem with its path; none when they
   * fit. A call whose arguments have a problem is answered with an error result that lists them, and run() is not
   * called. Unset, any JSON object goes to run().
   */
  check?(args: Record<string, unknown>): string[];
  /**
   * Runs the function; the result goes to the model as text: a string as it is, undefined as null, anything else as
   * JSON (or, where JSON cannot hold it, an error result that says so).
   */
  run(args: Args, context: ToolContext): unknown;
}

export interface ToolSpec<Args> {
  /** The name the model calls it by: letters, digits, _ and -. */
  name: string;
  /** What it does and when to use it, for the model. */
  description?: string;
  /**
   * Its arguments: a schema from `s`, which types `run`'s arguments and checks the model's before run gets them, or
   * a JSON Schema as an object or text, which is the model's to follow: the arguments are only checked to be a JSON
   * object (no general JSON Schema validator here), so `run` should check what it relies on.
   */
  parameters: Schema<Args, boolean> | object | string;
  /** Whether the model must follow the schema exactly (where the upstream supports it). */
  strict?: boolean;
  /** The function: its result (or the promise's) goes back to the model; what it throws, too, as an error text. */
  run: (args: Args, context: ToolContext) => unknown;
}

/**
 * A tool from its name, description, parameters and function.
 *
 * ```ts
 * const weather = tool({
 *   name: "get_weather",
 *   description: "The weather in a city now",
 *   parameters: s.object({ city: s.string() }),
 *   run: async ({ city }) => ({ city, celsius: 21 }),
 * });
 * ```
 */
export function tool<Args = Record<string, unknown>>(spec: ToolSpec<Args>): AgentTool<Args> {
  const built = isSchema(spec.parameters) ? spec.parameters : undefined;
  const parameters = built?.json ?? spec.parameters;
  return {
    name: spec.name,
    description: spec.description,
    definition: functionTool(spec.name, parameters, { description: spec.description, strict: spec.strict }),
    check: built === undefined ? undefined : (args) => built.check(args),
    run: spec.run,
  };
}

/**
 * The loop stopped at the step limit while the model still asked for tools. Those tools ran, and the conversation
 * ends with their results, as in the Python and Go SDKs: running it again goes on where this run stopped.
 */
export class StepLimitError extends Error {
  override readonly name = "StepLimitError";

  constructor(
    /** What the run did, its answer the last one, which asked for the tools whose results end the conversation. */
    readonly result: AgentResult,
  ) {
    super(
      `the model still asked for tools (${toolNames(result.answer)}) after ${result.steps} steps, the limit; raise ` +
        "maxSteps, tell the model to answer sooner, or run the conversation again to go on",
    );
  }
}

export interface AgentOptions {
  /** The tools the model may call; their names must differ. */
  tools: AgentTool<never>[];
  /** The most model calls in one run. Default: DEFAULT_MAX_STEPS. */
  maxSteps?: number;
  /** The model ("backend/model" or a model name); unset, the gateway's default. */
  model?: string;
  /**
   * Only the model asked for (`model`, or the gateway's default) may answer: every model call of the run sets the
   * request's exactModel, so the gateway never falls back to another backend's model. Default: false.
   */
  exactModel?: boolean;
  /**
   * How long each step's tools may run, in milliseconds from the step's start (> 0 and at most
   * MAX_TOOL_TIMEOUT_MS); unset, no bound. Then the signal each tool gets aborts, so that one which honours it
   * stops, and a call still running is answered `error: the tool did not finish within 0.5 s` (its seconds as
   * Python's %g writes them, as the Python SDK's tool_timeout words it); what it gives later is discarded, and the
   * run goes on with the next model call.
   */
  toolTimeoutMs?: number;
  /** Options of every request (temperature, maxTokens, toolChoice, ...); the tools are added to them. */
  options?: DeepPartial<CompletionOptions>;
}

export interface RunOptions extends CallOptions {
  /** Streams each step's answer and gets its pieces as they come (see Client.collect); unset, calls complete. */
  onDelta?: CollectOptions["onDelta"];
  /** With onDelta: a stream that started over on another backend (see Client.collect). */
  onRestart?: CollectOptions["onRestart"];
  /** Called after each step with its answer and the tool messages its calls gave (none for the final answer). */
  onStep?: (answer: CompleteResponse, toolMessages: MessageInput[]) => void;
}

/** What a run gives. */
export interface AgentResult {
  /** The last step's answer: with no tool calls when the run ended normally. */
  answer: CompleteResponse;
  /** The model calls made. */
  steps: number;
  /** The usage of every step, summed. */
  usage: Usage;
  /** The attempts of every step, in order. */
  attempts: Attempt[];
  /** The conversation, with every answer and tool result of the run appended. */
  conversation: Conversation;
}

/** The step limit of a run when AgentOptions sets none. */
export const DEFAULT_MAX_STEPS = 10;

/** The largest toolTimeoutMs: setTimeout's largest delay (some 24.8 days); Node fires a timer set past it at once. */
export const MAX_TOOL_TIMEOUT_MS = 2_147_483_647;

/**
 * A model with tools.
 *
 * ```ts
 * const agent = new Agent(client, { tools: [weather, clock] });
 * const { answer } = await agent.run([user("What is the weather in Paris, and what time is it there?")]);
 * console.log(answer.message?.content);
 * ```
 */
export class Agent {
  private readonly tools: Map<string, AgentTool<never>>;
  private readonly maxSteps: number;
  private readonly toolTimeoutMs: number | undefined;

  constructor(
    readonly client: Client,
    readonly options: AgentOptions,
  ) {
    this.tools = new Map();
    for (const t of options.tools) {
      if (this.tools.has(t.name)) {
        throw new Error(`two tools are named "${t.name}"; each tool needs a name of its own`);
      }
      this.tools.set(t.name, t);
    }
    this.maxSteps = options.maxSteps ?? DEFAULT_MAX_STEPS;
    if (!Number.isInteger(this.maxSteps) || this.maxSteps < 1) {
      throw new RangeError(`maxSteps is ${options.maxSteps}: give a whole number of at least 1`);
    }
    this.toolTimeoutMs = options.toolTimeoutMs;
    const ms: unknown = options.toolTimeoutMs;
    if (ms !== undefined && !(typeof ms === "number" && ms > 0 && ms <= MAX_TOOL_TIMEOUT_MS)) {
      throw new RangeError(
        `toolTimeoutMs is ${String(ms)}: give a number of milliseconds > 0 and at most ${MAX_TOOL_TIMEOUT_MS}, or ` +
          "leave it unset for no bound",
      );
    }
  }

  /**
   * Runs the loop on a conversation (appended to as it goes; trimmed to its budget before each step when it has
   * one) or on messages (copied). Resolves when the model answers without tool calls; rejects with StepLimitError
   * at the step limit, with an LLMRelayError when a call fails (a ContextBudgetError when the conversation no longer
   * fits; after a step, either holds the run so far as its `result`), and with the signal's reason when it aborts. A run
   * that stops leaves every tool call in the conversation answered, so that it can go on: aborted while tools run, it
   * appends their results, a call still running answered that the run was cancelled before it finished.
   */
  async run(input: Conversation | MessageInput[], options: RunOptions = {}): Promise<AgentResult> {
    const { onDelta, onRestart, onStep, ...callOptions } = options;
    // Not instanceof: a Conversation of this package's other build (CJS or ESM) is one too.
    const conversation = Array.isArray(input) ? new Conversation(input) : input;
    const definitions = [...this.tools.values()].map((t) => t.definition);
    const requestOptions = { ...this.options.options, tools: [...(this.options.options?.tools ?? []), ...definitions] };
    let usage = emptyUsage();
    const attempts: Attempt[] = [];
    let soFar: AgentResult | undefined;
    for (let step = 1; ; step++) {
      let answer: CompleteResponse;
      try {
        if (conversation.options.budgetTokens !== undefined) {
          // The tools' definitions and the answer's schema go with the prompt, so they take their share of the
          // budget; counted by the tokenizer of the model the step calls, unless the conversation names its own.
          const countOptions = {
            ...callOptions,
            tools: requestOptions.tools,
            model: this.options.model,
            responseFormat: requestOptions.responseFormat,
          };
          await conversation.fit(this.client, countOptions);
        }
        const request = {
          model: this.options.model,
          messages: conversation.messages,
          options: requestOptions,
          exactModel: this.options.exactModel ?? false,
        };
        answer = onDelta
          ? await this.client.collect(request, { ...callOptions, onDelta, onRestart })
          : await this.client.complete(request, callOptions);
      } catch (err) {
        // Aborted during a model call, which then fails CANCELLED: the run rejects with the signal's reason, as it
        // does when the signal aborts while the tools run.
        callOptions.signal?.throwIfAborted();
        if (soFar !== undefined && (err instanceof LLMRelayError || err instanceof ContextBudgetError)) {
          err.result = soFar;
        }
        throw err;
      }
      usage = addUsage(usage, answer.usage);
      attempts.push(...answer.attempts);
      const calls = answer.message?.toolCalls ?? [];
      const result = { answer, steps: step, usage, attempts, conversation };
      soFar = result;
      const toolMessages = await this.runCalls(calls, callOptions.signal);
      // The answer only with its calls' results: a conversation with a call unanswered is one no model call takes.
      conversation.addAnswer(answer);
      conversation.add(...toolMessages);
      onStep?.(answer, toolMessages);
      if (calls.length === 0) {
        return result;
      }
      callOptions.signal?.throwIfAborted();
      if (step >= this.maxSteps) {
        throw new StepLimitError(result);
      }
    }
  }

  /**
   * Runs the calls at once; resolves to their tool messages in the calls' order once all have returned, or as soon
   * as signal aborts, a call still running then answered that it did not finish (none start when it has aborted),
   * or once toolTimeoutMs has passed, a call still running then answered that it did not finish in time.
   */
  private async runCalls(calls: ToolCall[], signal: AbortSignal | undefined): Promise<MessageInput[]> {
    const results: (string | undefined)[] = calls.map(() => undefined);
    if (!signal?.aborted) {
      const bounded = this.toolTimeoutMs === undefined ? undefined : boundedSignal(signal, this.toolTimeoutMs);
      // The tools' signal: the run's, or one that aborts with it and at the timeout.
      const toolSignal = bounded?.signal ?? signal;
      try {
        const running = Promise.all(
          calls.map(async (call, i) => {
            const result = await this.runCall(call, toolSignal);
            // A tool that honours the signal settles once it aborts, with what it had or an error of its own, before
            // or after this run stops waiting as listeners happen to be ordered: whatever it gave, it did not finish,
            // and its call is answered so (below), as in the Python SDK.
            if (!toolSignal?.aborted) {
              results[i] = result;
            }
          }),
        );
        await untilAborted(running, toolSignal);
      } finally {
        bounded?.stop();
      }
    }
    // Past the timeout, the run's own abort aside: the run goes on, each call still running answered that it did
    // not finish in time.
    const timeoutMs = this.toolTimeoutMs;
    const unfinished = signal?.aborted || timeoutMs === undefined ? CANCELLED_RESULT : late(timeoutMs);
    return calls.map((call, i) => toolMessage(call, results[i] ?? unfinished));
  }

  /**
   * One call's result as text for the model: the tool's, or what went wrong (unknown tool, bad JSON, arguments that
   * are not an object or do not fit the tool's schema, a throw, a result JSON cannot hold).
   */
  private async runCall(call: ToolCall, signal: AbortSignal | undefined): Promise<string> {
    const name = call.function?.name ?? "";
    const found = this.tools.get(name);
    if (found === undefined) {
      // "none" where an empty list would read as cut off, as the Python and Go SDKs say it.
      const names = [...this.tools.keys()].join(", ") || "none";
      return `error: there is no tool named "${name}"; the tools are: ${names}`;
    }
    let args: unknown;
    try {
      const text = call.function?.arguments ?? "";
      args = JSON.parse(text.trim() === "" ? "{}" : text);
    } catch (err) {
      return `error: the arguments of ${name} are not valid JSON (${errorText(err)}); call it again with a JSON object`;
    }
    // Arguments are named, so only an object can be them: [1, 2] for add(a, b) would reach the tool as no a or b.
    if (typeof args !== "object" || args === null || Array.isArray(args)) {
      return `error: the arguments of ${JSON.stringify(name)} must be a JSON object, not ${jsonKind(args)}`;
    }
    let problems: string[];
    try {
      problems = found.check?.(args as Record<string, unknown>) ?? [];
    } catch (err) {
      return `error: ${name} failed: checking its arguments: ${errorText(err)}`; // a hand-made AgentTool's check
    }
    if (problems.length > 0) {
      return `error: invalid arguments for ${JSON.stringify(name)}: ${problems.join("; ")}`;
    }
    let value: unknown;
    try {
      value = await (found as AgentTool<unknown>).run(args, { call, signal });
    } catch (err) {
      return `error: ${name} failed: ${errorText(err)}`;
    }
    return resultText(value);
  }
}

/** The result of a tool call that the run's abort left unfinished. */
const CANCELLED_RESULT = "error: the run was cancelled before the tool finished";

/** The result of a tool call still running when the agent's toolTimeoutMs passed, as the Python SDK words it. */
function late(timeoutMs: number): string {
  return `error: the tool did not finish within ${formatG(timeoutMs / 1000)} s`;
}

/**
 * A number as Python's "%g" writes it (six significant digits, trailing zeros dropped, an exponent of at least two
 * digits below 1e-4 and from 1e6): 0.5 "0.5", 2 "2", 1e-5 "1e-05", 1234567 "1.23457e+06". For a finite number.
 */
export function formatG(value: number): string {
  const precision = 6;
  const exponential = value.toExponential(precision - 1); // rounded to the six digits, as %g rounds first
  const exponent = Number(exponential.slice(exponential.indexOf("e") + 1));
  const trimmed = (digits: string) => (digits.includes(".") ? digits.replace(/\.?0+$/, "") : digits);
  if (exponent >= -4 && exponent < precision) {
    return trimmed(value.toFixed(precision - 1 - exponent));
  }
  const mantissa = trimmed(exponential.slice(0, exponential.indexOf("e")));
  const sign = exponent < 0 ? "-" : "+";
  return `${mantissa}e${sign}${String(Math.abs(exponent)).padStart(2, "0")}`;
}

/**
 * A signal for a step's tools that aborts when `signal` does (with its reason) or once `timeoutMs` has passed (with
 * a DOMException named "TimeoutError", as AbortSignal.timeout's): AbortSignal.any and AbortSignal.timeout by hand,
 * since Node 20 before 20.3 (which the package's engines take) has no AbortSignal.any. stop() clears the timer and
 * the listener on `signal`, once the step's tools are answered.
 */
function boundedSignal(signal: AbortSignal | undefined, timeoutMs: number): { signal: AbortSignal; stop: () => void } {
  const controller = new AbortController();
  const stopWaiting = onAbort(signal, () => controller.abort(signal?.reason));
  const timer = setTimeout(() => {
    controller.abort(new DOMException(`the tools did not finish within ${timeoutMs} ms`, "TimeoutError"));
  }, timeoutMs);
  return {
    signal: controller.signal,
    stop: () => {
      clearTimeout(timer);
      stopWaiting();
    },
  };
}

/** Resolves when `work` settles, or sooner when `signal` aborts (at once when it has). */
async function untilAborted(work: Promise<unknown>, signal: AbortSignal | undefined): Promise<void> {
  if (signal?.aborted) {
    return;
  }
  let stopWaiting = () => {};
  const aborted = new Promise<void>((resolve) => {
    stopWaiting = onAbort(signal, resolve);
  });
  try {
    await Promise.race([work, aborted]);
  } finally {
    stopWaiting();
  }
}

/** What a parsed JSON value is, for an error text: "an array", "a string", "null", ... */
function jsonKind(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  return typeof value === "object" ? "an object" : `a ${typeof value}`;
}

/**
 * A tool's result as the text of its tool message: a string as it is; undefined (a function that returns nothing)
 * "null", as Python's None and Go's nil are; anything else its JSON. Where JSON cannot hold the result, an error
 * result that says why, as the Python and Go SDKs give, and never an empty text, which would read as a call never
 * finished: a function or a Symbol, a BigInt or a cycle, and what JSON.stringify would write as something else
 * without a word (NaN and ±Infinity as null, a Map, a Set, an Error or a RegExp as {}, a typed array as an object of
 * its indexes), anywhere in it.
 */
function resultText(value: unknown): string {
  if (typeof value === "string") {
    return value;
  }
  if (value === undefined) {
    return "null";
  }
  try {
    // A string always: what JSON.stringify gives as undefined (a function, a Symbol) the replacer refuses.
    return JSON.stringify(value, refusingLossyValues()) as string;
  } catch (err) {
    return `error: the tool's result cannot be written as JSON (${errorText(err)})`;
  }
}

/**
 * A replacer for JSON.stringify that throws, naming the path ("result.scores[1]"), at a value it would write as
 * another, or leave out: NaN and ±Infinity (as null), a Map or a Set (as {}), a function or a Symbol (left out of
 * an object, null in an array), an Error (without its message), a typed array (as an object of its indexes), and
 * any other object of a class that holds no field of its own (a RegExp, an ArrayBuffer, as {}). JSON.stringify
 * calls toJSON first (a Date's gives its ISO text), then the replacer, with the holder as `this`, before it descends
 * into the value, so each object's path is known when its own members come.
 */
function refusingLossyValues(): (this: unknown, key: string, value: unknown) => unknown {
  const paths = new WeakMap<object, string>();
  return function (this: unknown, key: string, value: unknown): unknown {
    const holder = typeof this === "object" && this !== null ? this : undefined;
    const parent = holder === undefined ? undefined : paths.get(holder);
    // The top-level value comes first, under the key "" of a holder made for it.
    const path = parent === undefined ? "result" : Array.isArray(holder) ? `${parent}[${key}]` : `${parent}.${key}`;
    const number = value instanceof Number ? value.valueOf() : value;
    if (typeof number === "number" && !Number.isFinite(number)) {
      throw new TypeError(`${number} at ${path}: JSON has no NaN or Infinity`);
    }
    if (value instanceof Map || value instanceof Set) {
      const kind = value instanceof Map ? "Map" : "Set";
      throw new TypeError(`a ${kind} at ${path}, which JSON.stringify writes as {}: return an object or an array`);
    }
    if (typeof value === "function" || typeof value === "symbol") {
      // Left out of an object, null in an array, by JSON.stringify: the model would read a result with less in it.
      throw new TypeError(`a ${typeof value} at ${path}, which JSON has no form for`);
    }
    if (typeof value === "object" && value !== null) {
      refuseUnlikeJSON(value, path);
      paths.set(value, path);
    }
    return value;
  };
}

/**
 * Throws at an object JSON.stringify writes as other than it is. Of any but a plain object (or one without a
 * prototype), an array or a boxed primitive (which it writes as the primitive), it writes the own enumerable fields
 * alone: an Error's message, a RegExp's pattern and an ArrayBuffer's bytes are none of them, and a typed array's
 * items come as an object of indexes. A class's instance with fields of its own is written as they are. A value with
 * toJSON never comes here, only what its toJSON returned.
 */
function refuseUnlikeJSON(value: object, path: string): void {
  const prototype: object | null = Object.getPrototypeOf(value);
  if (
    prototype === Object.prototype ||
    prototype === null ||
    Array.isArray(value) ||
    value instanceof Number ||
    value instanceof String ||
    value instanceof Boolean
  ) {
    return;
  }
  const name = className(prototype);
  const a = /^[AEIO]/i.test(name) ? "an" : "a";
  if (value instanceof Error) {
    throw new TypeError(
      `${a} ${name} at ${path}, which JSON.stringify writes without its message: throw it, or return its message`,
    );
  }
  if (ArrayBuffer.isView(value) && !(value instanceof DataView)) {
    throw new TypeError(
      `${a} ${name} at ${path}, which JSON.stringify writes as an object of its indexes: return an array (Array.from)`,
    );
  }
  if (Object.keys(value).length > 0) {
    return; // a class's instance with fields of its own: written as they are, as a plain object's would be
  }
  throw new TypeError(
    `${a} ${name} at ${path}, which JSON.stringify writes as {}, what it holds being no field of its own: return ` +
      "an object or an array",
  );
}

/** The name of the class whose prototype this is ("RegExp"), or "object of a class" when it names none. */
function className(prototype: object): string {
  const constructor: unknown = (prototype as { constructor?: unknown }).constructor;
  const name = typeof constructor === "function" ? constructor.name : "";
  return name === "" ? "object of a class" : name;
}

/**
 * What a tool threw, as the text of its error result; never throws itself, so that one tool's odd throw cannot end
 * the run and lose the step's other results. An Error is its message; a plain object (or one without a prototype)
 * its JSON, which String() would make "[object Object]"; anything else String() of it. Where these fail (a cycle in
 * an object without a prototype, which has no toString either; a getter that throws), Object.prototype.toString's
 * tag, "[object Object]".
 */
function errorText(err: unknown): string {
  try {
    if (err instanceof Error) {
      return String(err.message);
    }
    if (typeof err === "object" && err !== null) {
      const prototype: unknown = Object.getPrototypeOf(err);
      if (prototype === Object.prototype || prototype === null) {
        const json: string | undefined = JSON.stringify(err);
        if (json !== undefined) {
          return json;
        }
      }
    }
    return String(err);
  } catch {
    try {
      return Object.prototype.toString.call(err);
    } catch {
      return `a thrown ${typeof err}`; // a revoked Proxy refuses even that
    }
  }
}

function toolNames(answer: CompleteResponse): string {
  return (answer.message?.toolCalls ?? []).map((call) => call.function?.name ?? "?").join(", ");
}

function emptyUsage(): Usage {
  return { promptTokens: 0, completionTokens: 0, totalTokens: 0, estimated: false, cost: undefined };
}

/** The sum of two usages: token counts and costs added, estimated when either is. Pure. */
export function addUsage(a: Usage, b: Usage | undefined): Usage {
  if (b === undefined) {
    return a;
  }
  const optional = (x: number | undefined, y: number | undefined) =>
    x === undefined && y === undefined ? undefined : (x ?? 0) + (y ?? 0);
  const cost =
    a.cost === undefined || b.cost === undefined
      ? (a.cost ?? b.cost)
      : {
          usdMicros: a.cost.usdMicros + b.cost.usdMicros,
          estimated: a.cost.estimated || b.cost.estimated,
          priceUnknown: a.cost.priceUnknown || b.cost.priceUnknown,
        };
  return {
    promptTokens: a.promptTokens + b.promptTokens,
    completionTokens: a.completionTokens + b.completionTokens,
    totalTokens: a.totalTokens + b.totalTokens,
    estimated: a.estimated || b.estimated,
    reasoningTokens: optional(a.reasoningTokens, b.reasoningTokens),
    cachedPromptTokens: optional(a.cachedPromptTokens, b.cachedPromptTokens),
    cacheWritePromptTokens: optional(a.cacheWritePromptTokens, b.cacheWritePromptTokens),
    cost,
  };
}

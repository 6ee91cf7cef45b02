/**
 * A conversation: the messages of a chat as it grows, and a token budget (counted by the gateway's CountTokens)
 * that it trims the oldest turns to fit.
 */
import { Role, type CompleteResponse, type ToolCall } from "./gen/llmrelay/v1/llmrelay";
import type { CallOptions, Client, CountTokensInput, MessageInput } from "./client";
import type { ToolInput } from "./content";
import type { AgentResult } from "./agent";

export interface ConversationOptions {
  /**
   * The most tokens the messages may count, for example the model's context window less the room for its answer.
   * Unset, fit() trims nothing.
   */
  budgetTokens?: number;
  /** The model whose tokenizer counts ("backend/model" or a model name); unset, the gateway's default. */
  model?: string;
  /** Tools sent with every request: their definitions count too. */
  tools?: ToolInput[];
}

/** How countTokens() and fit() count. */
export interface CountOptions extends CallOptions {
  /**
   * The tools the request will offer, whose definitions count too, in place of the conversation's options.tools:
   * an Agent passes the tools it sends.
   */
  tools?: ToolInput[];
  /**
   * The model whose tokenizer counts when the conversation's options name none: an Agent passes the model it calls,
   * so that the budget is counted in that model's tokens (the conversation's own model, when set, still counts).
   */
  model?: string;
  /**
   * The answer format the request will ask for, whose JSON schema goes into the prompt and counts too: an Agent
   * passes its options' responseFormat.
   */
  responseFormat?: CountTokensInput["responseFormat"];
}

/** What fit() did. */
export interface FitResult {
  /** The tokens the messages count now. */
  tokenCount: number;
  /** The messages it removed, oldest first. */
  dropped: MessageInput[];
}

/** The last turn alone counts more tokens than the budget: trimming cannot make the conversation fit. */
export class ContextBudgetError extends Error {
  override readonly name = "ContextBudgetError";
  /** Of a fit before an Agent's step after the first: the run so far, as LLMRelayError's `result`. */
  result: AgentResult | undefined;

  constructor(
    readonly tokenCount: number,
    readonly budgetTokens: number,
  ) {
    super(
      `the conversation counts ${tokenCount} tokens after dropping every turn but the last, over its budget of ` +
        `${budgetTokens}; shorten the last turn or raise budgetTokens`,
    );
  }
}

/**
 * The messages of a chat, in order. Turns are what fit() trims: a turn starts at a user message and holds the
 * answers and tool results after it, so a tool call never loses its result; system messages stay.
 *
 * ```ts
 * const chat = new Conversation([system("Be brief.")], { budgetTokens: 4_000 });
 * chat.add(user("Hello"));
 * await chat.fit(client);
 * chat.addAnswer(await client.complete({ messages: chat.messages }));
 * ```
 */
export class Conversation {
  private readonly history: MessageInput[];

  constructor(
    messages: MessageInput[] = [],
    readonly options: ConversationOptions = {},
  ) {
    const budget = options.budgetTokens;
    if (budget !== undefined && !(budget >= 0)) {
      // A context window less an answer's maxTokens gone below 0: fit() would drop every turn but the last, then
      // fail, the history gone; as the Python SDK refuses it.
      throw new RangeError(`budgetTokens must be 0 or more, not ${budget}`);
    }
    this.history = [...messages];
  }

  /** The messages, oldest first (a copy). */
  get messages(): MessageInput[] {
    return [...this.history];
  }

  /** Appends messages. */
  add(...messages: MessageInput[]): this {
    this.history.push(...messages);
    return this;
  }

  /** Appends an answer's assistant message (its content, reasoning and tool calls). */
  addAnswer(answer: CompleteResponse): this {
    if (answer.message === undefined) {
      throw new Error(`the answer ${answer.id} has no message`);
    }
    return this.add(answer.message);
  }

  /** Appends the result of a tool call, as a tool message. */
  addToolResult(call: ToolCall, content: string): this {
    return this.add(toolMessage(call, content));
  }

  /**
   * Counts the tokens of the messages, the tools (countOptions.tools, else the options' tools) and the answer format
   * (countOptions.responseFormat) for the options' model (else countOptions.model, else the gateway's default),
   * through CountTokens.
   */
  async countTokens(client: Client, countOptions: CountOptions = {}): Promise<number> {
    const { tools = this.options.tools, model, responseFormat, ...callOptions } = countOptions;
    // An empty model names none, as the gateway reads it.
    const request = { model: this.options.model || model, tools, responseFormat, messages: this.history };
    const answer = await client.countTokens(request, callOptions);
    return answer.tokenCount;
  }

  /**
   * Drops the oldest turns until the messages count at most budgetTokens; system messages and the last turn stay.
   * The tools count as countTokens() counts them. Rejects with ContextBudgetError when the last turn alone is over the
   * budget. One CountTokens call, and one more per dropped turn. When it rejects (over the budget, a count failed),
   * the messages are as they were: the turns it had dropped would be lost to a caller who then raises the budget or
   * shortens the last turn.
   */
  async fit(client: Client, countOptions?: CountOptions): Promise<FitResult> {
    const budget = this.options.budgetTokens;
    const before = [...this.history];
    const dropped: MessageInput[] = [];
    try {
      for (;;) {
        const tokenCount = await this.countTokens(client, countOptions);
        if (budget === undefined || tokenCount <= budget) {
          return { tokenCount, dropped };
        }
        const oldest = turnsOf(this.history)[0];
        if (oldest === undefined || oldest.end === this.history.length) {
          throw new ContextBudgetError(tokenCount, budget);
        }
        const turn = this.history.slice(oldest.start, oldest.end);
        this.history.splice(oldest.start, turn.length, ...turn.filter(isSystem));
        dropped.push(...turn.filter((message) => !isSystem(message)));
      }
    } catch (err) {
      this.history.splice(0, this.history.length, ...before);
      throw err;
    }
  }
}

/** A tool message that answers a call. */
export function toolMessage(call: ToolCall, content: string): MessageInput {
  return { role: Role.ROLE_TOOL, toolCallId: call.id, name: call.function?.name, content };
}

function isSystem(message: MessageInput): boolean {
  return message.role === Role.ROLE_SYSTEM;
}

/** A half-open range of message indexes. */
interface Turn {
  start: number;
  end: number;
}

/**
 * The turns of a chat: each starts at a user message (the messages before the first user message that are not
 * system messages make one turn of their own) and runs to the next user message. Pure.
 */
export function turnsOf(messages: readonly MessageInput[]): Turn[] {
  const turns: Turn[] = [];
  messages.forEach((message, i) => {
    const current = turns.at(-1);
    if (message.role === Role.ROLE_USER || (current === undefined && !isSystem(message))) {
      turns.push({ start: i, end: i + 1 });
    } else if (current !== undefined) {
      current.end = i + 1;
    }
  });
  return turns;
}

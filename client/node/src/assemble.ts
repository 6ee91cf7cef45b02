/**
 * Folding a stream into the answer Complete would give: the deltas concatenated, tool calls assembled from their
 * fragments, and a restart marker (InterruptPolicy RESTART) discarding everything before it. Pure, no I/O.
 */
import {
  CompleteResponse,
  FinishReason,
  Role,
  type Attempt,
  type StreamCompleteResponse,
  type StreamRestart,
  type ToolCall,
  type Usage,
} from "./gen/llmrelay/v1/llmrelay";

/** A stream message that starts the answer over: every delta before it is void. */
export type RestartChunk = StreamCompleteResponse & { restart: StreamRestart };

/**
 * Whether the message is the gateway's restart marker (only sent to requests with onInterrupt =
 * INTERRUPT_POLICY_RESTART): the stream of one backend broke after it had started, the request runs again on the
 * next, and the deltas after this message replace every delta before it.
 */
export function isRestart(chunk: StreamCompleteResponse): chunk is RestartChunk {
  return chunk.restart !== undefined;
}

/** Whether the message carries a piece of the answer: content, reasoning or a tool call fragment. */
export function hasDelta(chunk: StreamCompleteResponse): boolean {
  const delta = chunk.delta;
  return !!delta && (!!delta.content || !!delta.reasoning || delta.toolCalls.length > 0);
}

/**
 * Folds the messages of a stream, in order, into a CompleteResponse.
 *
 * ```ts
 * const assembler = new StreamAssembler();
 * for await (const chunk of client.stream(request)) assembler.add(chunk);
 * const answer = assembler.result();
 * ```
 */
export class StreamAssembler {
  /** The restart markers seen, in order. */
  readonly restarts: StreamRestart[] = [];
  private id = "";
  private backend = "";
  private model = "";
  private content = "";
  private reasoning: string | undefined;
  private reasoningSignature: string | undefined;
  private toolCalls = new Map<number, ToolCall>();
  private finishReason = FinishReason.FINISH_REASON_UNSPECIFIED;
  private usage: Usage | undefined;
  private attempts: Attempt[] = [];

  /** Folds in the next message of the stream; a restart marker discards everything folded in before it. */
  add(chunk: StreamCompleteResponse): void {
    if (isRestart(chunk)) {
      this.restarts.push(chunk.restart);
      this.id = this.backend = this.model = this.content = "";
      this.reasoning = this.reasoningSignature = undefined;
      this.toolCalls = new Map();
      this.finishReason = FinishReason.FINISH_REASON_UNSPECIFIED;
      this.usage = undefined;
      this.attempts = [];
      return;
    }
    this.id = chunk.id || this.id;
    this.backend = chunk.backend || this.backend;
    this.model = chunk.model || this.model;
    const delta = chunk.delta;
    if (delta) {
      this.content += delta.content ?? "";
      if (delta.reasoning !== undefined) {
        this.reasoning = (this.reasoning ?? "") + delta.reasoning;
      }
      this.reasoningSignature = delta.reasoningSignature ?? this.reasoningSignature;
      for (const fragment of delta.toolCalls) {
        let call = this.toolCalls.get(fragment.index);
        if (!call) {
          call = { id: "", function: { name: "", arguments: "" } };
          this.toolCalls.set(fragment.index, call);
        }
        call.id ||= fragment.id ?? "";
        call.function!.name ||= fragment.name ?? "";
        call.function!.arguments += fragment.arguments ?? "";
        call.signature ??= fragment.signature;
      }
    }
    // Set only in the last message.
    if (chunk.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED) {
      this.finishReason = chunk.finishReason;
    }
    this.usage = chunk.usage ?? this.usage;
    if (chunk.attempts.length > 0) {
      this.attempts = chunk.attempts;
    }
  }

  /**
   * The answer so far (the whole answer once the stream has ended): an assistant message with the content,
   * reasoning and tool calls (ordered by index) since the last restart, and the last message's finish reason,
   * usage and attempts. Built as the generated decoder builds complete()'s answer, so the two compare equal.
   */
  result(): CompleteResponse {
    const toolCalls = [...this.toolCalls.entries()].sort(([a], [b]) => a - b).map(([, call]) => call);
    return CompleteResponse.fromPartial({
      id: this.id,
      backend: this.backend,
      model: this.model,
      message: {
        role: Role.ROLE_ASSISTANT,
        content: this.content,
        toolCalls,
        reasoning: this.reasoning,
        reasoningSignature: this.reasoningSignature,
      },
      finishReason: this.finishReason,
      usage: this.usage,
      attempts: this.attempts,
    });
  }
}

/** Folds a whole stream's messages into the answer (see StreamAssembler). */
export function assemble(chunks: Iterable<StreamCompleteResponse>): CompleteResponse {
  const assembler = new StreamAssembler();
  for (const chunk of chunks) {
    assembler.add(chunk);
  }
  return assembler.result();
}

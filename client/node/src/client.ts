/**
 * The llmrelay client: one gRPC channel to the gateway, promise methods, `stream()` as an async iterator.
 */
import {
  Metadata,
  status,
  type CallOptions as GrpcCallOptions,
  type ChannelCredentials,
  type ChannelOptions,
  type ClientReadableStream,
  type ClientUnaryCall,
  type Interceptor,
  type ServiceError,
} from "@grpc/grpc-js";

import {
  CompleteRequest,
  CountTokensRequest,
  EmbedRequest,
  GetUsageRequest,
  HealthRequest,
  InterruptPolicy,
  LLMServiceClient,
  Role,
  StreamCompleteRequest,
  type CompleteResponse,
  type CountTokensResponse,
  type DeepPartial,
  type EmbedResponse,
  type GetUsageResponse,
  type HealthResponse,
  type Message,
  type StreamCompleteResponse,
  type StreamRestart,
} from "./gen/llmrelay/v1/llmrelay";
import { SERVICE_CONFIG_JSON } from "./gen/llmrelay/v1/service_config";
import { checkedSignal, onAbort } from "./abort";
import { StreamAssembler, hasDelta, isRestart } from "./assemble";
import { textFormat, textTools, withJsonText } from "./content";
import { DOMAIN, LLMRelayError, toError } from "./errors";
import {
  channelCredentials,
  chooseTransport,
  closedWithoutAWord,
  targetProblem,
  type TlsOptions,
  type Transport,
} from "./tls";

/** Where a gateway listens by default. */
export const DEFAULT_TARGET = "127.0.0.1:50051";
/** The deadline of a call that sets none, unless ClientOptions.timeoutMs says otherwise. */
export const DEFAULT_TIMEOUT_MS = 120_000;
/**
 * The longest timeout (some 30 years, as in the Python SDK): further out, grpc-js cannot write the deadline in its
 * header and throws outside the call, ending the process.
 */
export const MAX_TIMEOUT_MS = 1e12;
/** The metadata key that names the caller in the gateway's usage ledger. */
export const CALLER_HEADER = "x-llmrelay-caller";

/** A request as plain values: every field optional, as for `CompleteRequest.fromPartial`. */
export type CompleteInput = DeepPartial<CompleteRequest>;
export type StreamInput = DeepPartial<StreamCompleteRequest>;
export type CountTokensInput = DeepPartial<CountTokensRequest>;
export type EmbedInput = DeepPartial<EmbedRequest>;
export type GetUsageInput = DeepPartial<GetUsageRequest>;
export type MessageInput = DeepPartial<Message>;

export interface ClientOptions {
  /**
   * true: plaintext (a gateway inside a trusted network); false: TLS even to a loopback target. Default: plaintext
   * to loopback targets (127.0.0.0/8, ::1, localhost, unix:), TLS with the system's roots to any other.
   */
  insecure?: boolean;
  /** TLS with your CA (rootCerts), or mutual TLS (privateKey and certChain), as PEM. */
  tls?: TlsOptions;
  /** Channel credentials built by you; they override insecure and tls. */
  credentials?: ChannelCredentials;
  /**
   * Deadline of calls that set none, in milliseconds; null for no deadline (a call may then wait forever).
   * Default: DEFAULT_TIMEOUT_MS. The constructor throws a RangeError for a number out of range, a TypeError for what
   * is no number (a string such as "30000").
   */
  timeoutMs?: number | null;
  /** Names the caller in the gateway's usage ledger (the x-llmrelay-caller metadata). */
  caller?: string;
  /**
   * Metadata sent with every call (for example `{ authorization: "Bearer KEY" }`): printable ASCII text, or a Buffer
   * for a key ending -bin. The constructor throws a TypeError for a key or a value gRPC cannot send, the
   * connection-specific headers of HTTP/1 among them (connection, keep-alive, proxy-connection, transfer-encoding,
   * upgrade, http2-settings), for a key starting grpc- (gRPC's own, reserved), and for metadata that is no object of
   * keys (a string).
   */
  metadata?: Record<string, string | Buffer>;
  /**
   * Options of the gRPC channel ("grpc.keepalive_time_ms", ...). "grpc.service_config" defaults to
   * SERVICE_CONFIG_JSON, the contract's retry policy (UNAVAILABLE, three attempts, backoff, the gateway's
   * grpc-retry-pushback-ms honoured): give your own to change it, or "grpc.enable_retries": 0 to retry nothing.
   */
  channelOptions?: ChannelOptions;
  /** Client interceptors of @grpc/grpc-js, run on every call in this order. */
  interceptors?: Interceptor[];
}

export interface CallOptions {
  /** Deadline of this call, in milliseconds from now, or null for none; overrides the client's timeoutMs. */
  timeoutMs?: number | null;
  /** Deadline of this call as a point in time; overrides timeoutMs. */
  deadline?: Date;
  /**
   * Cancels the call: it then fails with CANCELLED. A signal aborted already starts no call: it rejects with the
   * signal's reason, as fetch() does. Anything but an AbortSignal (the AbortController itself) rejects with a
   * TypeError, and starts no call either.
   */
  signal?: AbortSignal;
  /**
   * Metadata for this call, on top of the client's (a key it sets replaces the client's). A key or a value gRPC
   * cannot send rejects the call with a TypeError, as ClientOptions.metadata does.
   */
  metadata?: Record<string, string | Buffer>;
}

export interface CollectOptions extends CallOptions {
  /**
   * Called with each stream message that carries a piece of the answer (content, reasoning or a tool call
   * fragment), as it arrives: for printing the answer as it comes.
   */
  onDelta?: (chunk: StreamCompleteResponse) => void;
  /**
   * Called when the gateway starts the answer over on another backend: every piece onDelta was given before is
   * void (erase what you printed).
   */
  onRestart?: (restart: StreamRestart) => void;
}

/** A system message: instructions that frame the conversation. */
export function system(content: string): MessageInput {
  return { role: Role.ROLE_SYSTEM, content };
}

/** A user message. */
export function user(content: string): MessageInput {
  return { role: Role.ROLE_USER, content };
}

/** An assistant message, for earlier turns of the chat. */
export function assistant(content: string): MessageInput {
  return { role: Role.ROLE_ASSISTANT, content };
}

type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<GrpcCallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

/**
 * A client of one gateway. Failed calls reject with (and streams throw) an LLMRelayError, which carries the
 * ErrorInfo reason, RetryInfo delay and BadRequest field violations of the status.
 *
 * ```ts
 * const client = new Client("127.0.0.1:50051"); // loopback: plaintext; any other host: TLS
 * for await (const chunk of client.stream({ messages: [user("Hello")] })) {
 *   process.stdout.write(chunk.delta?.content ?? "");
 * }
 * client.close();
 * ```
 */
export class Client {
  /**
   * The generated @grpc/grpc-js client, behind the `raw` getter. A true private field, as #headers is: through it
   * util.inspect of the client with depth reached the channel and the calls waiting there for a connection, each
   * holding its metadata, the caller's key among it.
   */
  readonly #raw: LLMServiceClient;
  /** How the channel reaches the gateway; undefined when ClientOptions.credentials decided. */
  readonly transport: Transport | undefined;
  /**
   * What the transport rule chose and how to choose otherwise, for a failure to reach the gateway; undefined when
   * the caller chose (insecure, tls or credentials).
   */
  private readonly securityHint: string | undefined;
  /**
   * What a gateway with mutual TLS wants of this client, given no certificate or one it did not take, for a TLS
   * connection the gateway closed without a word (see closedWithoutAWord); undefined over plaintext, or with
   * credentials of the caller's own (what they present is not known).
   */
  private readonly certificateHint: string | undefined;
  private readonly timeoutMs: number | null;
  /**
   * The metadata sent with every call. A true private field, as util.inspect and console.log show none: it may hold
   * the caller's key to the gateway ({ authorization: "Bearer KEY" }), which they printed in clear, the client's and
   * whatever held it (an Agent).
   */
  readonly #headers: Record<string, string | Buffer>;
  /**
   * The calls in flight, unary and streams: close() cancels them, as grpc-js's close() lets them run on. Private as
   * #headers is: a call holds its metadata, which util.inspect of the client with depth showed.
   */
  readonly #active = new Set<{ cancel(): void }>();
  /** Set by close(): a call after it fails as in the Python SDK, not with grpc-js's plain Error. */
  private closed = false;
  /**
   * Set once a call has heard from the gateway (its response headers or a message): the transport is the gateway's,
   * and a later call that cannot reach it (the gateway gone, or restarting) is given no hint to change it.
   */
  private reached = false;

  constructor(
    readonly target: string = DEFAULT_TARGET,
    options: ClientOptions = {},
  ) {
    // Not showing the target, which may hold a password (a URL's).
    const problem = targetProblem(target);
    if (problem !== undefined) {
      throw new Error(`target: ${problem}`);
    }
    this.transport = options.credentials ? undefined : chooseTransport(target, options);
    this.securityHint = transportHint(options, this.transport);
    this.certificateHint = certificateHint(options, this.transport);
    this.#raw = new LLMServiceClient(target, channelCredentials(target, options), {
      // Answers of any size: the gateway bounds them by its server.max_message_bytes, which an operator raises for
      // large images, and with it its answers (gRPC's default of 4 MiB failed a large Embed after it was billed).
      "grpc.max_receive_message_length": -1,
      "grpc.service_config": SERVICE_CONFIG_JSON,
      ...options.channelOptions,
      interceptors: options.interceptors,
    });
    this.timeoutMs = options.timeoutMs === undefined ? DEFAULT_TIMEOUT_MS : checkedTimeout(options.timeoutMs);
    // Each checked on its own: spread, a string of metadata would give keys "0", "1", ... that pass.
    this.#headers = {
      ...checkedMetadata(options.metadata),
      ...checkedMetadata(options.caller ? { [CALLER_HEADER]: options.caller } : undefined),
    };
  }

  /**
   * The generated @grpc/grpc-js client, for anything this class does not wrap. Its calls go over the client's channel
   * (its TLS, retry policy and interceptors) but carry neither ClientOptions.metadata (a key among it) nor the
   * default timeout, and fail with grpc-js's errors (parseError reads them): give each call its metadata and deadline.
   */
  get raw(): LLMServiceClient {
    return this.#raw;
  }

  /** Answers a chat with one assistant message. */
  async complete(request: CompleteInput, options?: CallOptions): Promise<CompleteResponse> {
    const input = { ...request, options: withJsonText(request.options) };
    return this.unary(this.#raw.complete, CompleteRequest.fromPartial(input), options);
  }

  /**
   * Answers a chat as a stream of deltas; the last message carries the finish reason and usage. Breaking out of
   * the loop early cancels the call, so the gateway stops asking the upstream.
   *
   * With `onInterrupt: InterruptPolicy.INTERRUPT_POLICY_RESTART`, a stream that breaks after it started may go on
   * on the next backend: the gateway then sends one message with only `restart` set (`isRestart(chunk)`), and the
   * deltas after it replace every delta before it. `collect()` handles this for you.
   */
  async *stream(request: StreamInput, options?: CallOptions): AsyncGenerator<StreamCompleteResponse, void, undefined> {
    if (this.closed) {
      throw closedError();
    }
    // As unary calls do: a signal that is none, or one aborted already, starts nothing.
    const signal = checkedSignal(options?.signal);
    if (signal?.aborted) {
      throw signal.reason;
    }
    let call: ClientReadableStream<StreamCompleteResponse>;
    try {
      call = this.#raw.streamComplete(
        StreamCompleteRequest.fromPartial({ ...request, options: withJsonText(request.options) }),
        this.metadata(options),
        this.callOptions(options),
      );
    } catch (err) {
      // A client interceptor that fails the call in start() makes grpc-js emit the error inside streamComplete,
      // before there is a listener: it throws the raw status.
      throw this.explain(unencodable(toError(err)), false);
    }
    this.#active.add(call);
    // Whether anything came from the gateway, its response headers or a message: then it was reached.
    let reached = false;
    call.once("metadata", () => {
      reached = this.reached = true;
    });
    const stopWaiting = onAbort(signal, () => call.cancel());
    try {
      for await (const chunk of call) {
        reached = this.reached = true;
        yield chunk as StreamCompleteResponse;
      }
    } catch (err) {
      throw this.explain(unencodable(toError(err)), reached);
    } finally {
      stopWaiting();
      call.on("error", () => {}); // the CANCELLED of an early exit is nobody's error
      call.cancel();
      this.#active.delete(call);
    }
  }

  /**
   * Streams the answer and resolves to it whole, as complete() would give it: the content, reasoning and tool
   * calls assembled from the deltas (see StreamAssembler), with the finish reason, usage and attempts of the last
   * message. The request asks for INTERRUPT_POLICY_RESTART unless it sets another onInterrupt (unset and
   * INTERRUPT_POLICY_UNSPECIFIED alike mean RESTART), so a stream that breaks midway starts over on the next backend
   * and the answer is that backend's alone. `onDelta` sees the pieces as
   * they come, `onRestart` each start-over. Rejects with an LLMRelayError, as stream() throws.
   */
  async collect(request: StreamInput, options: CollectOptions = {}): Promise<CompleteResponse> {
    const { onDelta, onRestart, ...callOptions } = options;
    const assembler = new StreamAssembler();
    // UNSPECIFIED (0) is the contract's "not set", and what StreamCompleteRequest.create() and fromPartial() fill in.
    const unset =
      request.onInterrupt === undefined || request.onInterrupt === InterruptPolicy.INTERRUPT_POLICY_UNSPECIFIED;
    const input = { ...request, onInterrupt: unset ? InterruptPolicy.INTERRUPT_POLICY_RESTART : request.onInterrupt };
    for await (const chunk of this.stream(input, callOptions)) {
      assembler.add(chunk);
      if (isRestart(chunk)) {
        onRestart?.(chunk.restart);
      } else if (hasDelta(chunk)) {
        onDelta?.(chunk);
      }
    }
    return assembler.result();
  }

  /**
   * Counts the tokens of a chat (with the tools and the answer format its request will carry) or of a text, for a
   * model.
   */
  async countTokens(request: CountTokensInput, options?: CallOptions): Promise<CountTokensResponse> {
    const input = { ...request, tools: textTools(request.tools), responseFormat: textFormat(request.responseFormat) };
    return this.unary(this.#raw.countTokens, CountTokensRequest.fromPartial(input), options);
  }

  /**
   * Turns texts into vectors, one per input in the order of `inputs` (`embeddings[i].values`), all from one
   * embedding model: `model` (or "backend/model"), else the gateway's default embedding model. The gateway may retry,
   * or ask another backend serving the same model, but never another model.
   */
  async embed(request: EmbedInput, options?: CallOptions): Promise<EmbedResponse> {
    return this.unary(this.#raw.embed, EmbedRequest.fromPartial(request), options);
  }

  /** Reports the state of every backend; with probe, checks them now instead of reporting the last probe. */
  async health(probe = false, options?: CallOptions): Promise<HealthResponse> {
    return this.unary(this.#raw.health, HealthRequest.fromPartial({ probe }), options);
  }

  /** Reads the usage ledger: token totals per backend, model and caller. */
  async getUsage(request: GetUsageInput = {}, options?: CallOptions): Promise<GetUsageResponse> {
    return this.unary(this.#raw.getUsage, GetUsageRequest.fromPartial(request), options);
  }

  /** Closes the channel; calls in flight fail with CANCELLED, and the gateway stops answering them. */
  close(): void {
    this.closed = true;
    for (const call of this.#active) {
      call.cancel();
    }
    this.#raw.close();
  }

  private unary<Req, Res>(method: UnaryMethod<Req, Res>, request: Req, options?: CallOptions): Promise<Res> {
    return new Promise<Res>((resolve, reject) => {
      if (this.closed) {
        reject(closedError());
        return;
      }
      // Before the call starts: given no AbortSignal (the AbortController itself, from plain JavaScript), onAbort
      // threw after it, and the gateway ran and billed a call whose promise had rejected.
      const signal = checkedSignal(options?.signal);
      if (signal?.aborted) {
        reject(signal.reason);
        return;
      }
      let reached = false; // whether the gateway's response headers came
      let settled = false;
      // Lets go of what the call holds while in flight (its place in this.#active, the signal's listener). The
      // callback may run inside method.call, before the call holds anything: a client interceptor can fail it in
      // start().
      let release = (): void => {};
      const call = method.call(this.#raw, request, this.metadata(options), this.callOptions(options), (err, res) => {
        settled = true;
        release();
        if (err) {
          reject(this.explain(unencodable(toError(err)), reached));
        } else {
          resolve(res);
        }
      });
      if (settled) {
        return;
      }
      try {
        call.once("metadata", () => {
          reached = this.reached = true;
        });
        this.#active.add(call);
        const stopWaiting = onAbort(signal, () => call.cancel());
        release = () => {
          this.#active.delete(call);
          stopWaiting();
        };
      } catch (err) {
        // Nothing started stays behind: neither the call, which the gateway would run and bill for nobody, nor its
        // place in this.#active, which held it (and its metadata) until close().
        this.#active.delete(call);
        reject(err);
        call.cancel();
      }
    });
  }

  private metadata(options?: CallOptions): Metadata {
    const metadata = new Metadata();
    for (const [key, value] of Object.entries({ ...this.#headers, ...checkedMetadata(options?.metadata) })) {
      metadata.set(key, value);
    }
    return metadata;
  }

  private callOptions(options?: CallOptions): Partial<GrpcCallOptions> {
    if (options?.deadline) {
      const at = options.deadline.getTime();
      if (!(at - Date.now() <= MAX_TIMEOUT_MS)) {
        throw new RangeError(
          `deadline is ${Number.isNaN(at) ? "an invalid Date" : options.deadline.toISOString()}: give a Date at most` +
            ` ${MAX_TIMEOUT_MS} ms from now, or timeoutMs: null for no deadline`,
        );
      }
      return { deadline: options.deadline };
    }
    const timeoutMs = options?.timeoutMs === undefined ? this.timeoutMs : checkedTimeout(options.timeoutMs);
    return timeoutMs === null ? {} : { deadline: Date.now() + timeoutMs };
  }

  /**
   * Adds to a failure to reach the gateway (UNAVAILABLE without the gateway's ErrorInfo) what to try. Where the
   * gateway closed a TLS connection without a word (closedWithoutAWord), as one with mutual TLS does to a client it
   * does not take, what to give it: a client certificate, or one its client CA issued. Else, over the transport the
   * rule chose, what it chose and how to choose otherwise: a gateway that serves TLS drops a plaintext client with no
   * word of TLS in the status, and a plaintext gateway fails a TLS client with OpenSSL's "wrong version number". A
   * caller who chose needs no word of the rule, and neither does a call that reached the gateway (`reached`: its
   * response headers, a message or an error of its own came), such as a stream cut by a gateway that went away
   * midway, nor one after it.
   */
  private explain(err: unknown, reached: boolean): unknown {
    if (err instanceof LLMRelayError && (err.errorInfo?.domain === DOMAIN || err.requestId !== undefined)) {
      // An error the gateway answered with comes trailers-only, no headers: its ErrorInfo, or its request id, says
      // it came from the gateway all the same.
      this.reached = true;
    }
    if (reached || this.reached || !(err instanceof LLMRelayError) || err.code !== status.UNAVAILABLE || err.errorInfo !== undefined) {
      return err;
    }
    // The certificate's first: the more specific, and TLS with the system's roots was right if the gateway got as far
    // as asking for a client certificate.
    const hint =
      this.certificateHint !== undefined && closedWithoutAWord(err.details) ? this.certificateHint : this.securityHint;
    return hint === undefined ? err : err.withHint(hint);
  }
}

/**
 * What the transport rule chose (`chosen`) and how to choose otherwise, as the Go and Python SDKs say it; undefined
 * when the options chose. Not naming the target, which may hold a password.
 */
function transportHint(options: ClientOptions, chosen: Transport | undefined): string | undefined {
  if (options.credentials !== undefined || options.insecure !== undefined || options.tls !== undefined) {
    return undefined;
  }
  return chosen === "plaintext"
    ? "this client connects in plaintext (the default for loopback targets); if the gateway serves TLS, pass" +
        " { tls: { rootCerts } } or { insecure: false }"
    : "this client connects over TLS with the system's roots (the default for targets that are not loopback); if" +
        " the gateway serves plaintext, pass { insecure: true }, or { tls: { rootCerts } } for a private CA";
}

/**
 * What a gateway that asks for a client certificate (mutual TLS) wants of this client, as the Go and Python SDKs say
 * it: a certificate where it gave none, else one of the gateway's client CA. Undefined where the transport is not TLS,
 * or the caller's credentials decided (`chosen` is then undefined).
 */
function certificateHint(options: ClientOptions, chosen: Transport | undefined): string | undefined {
  if (chosen !== "tls") {
    return undefined;
  }
  // channelCredentials() takes privateKey and certChain only together: a certChain is a client certificate.
  return options.tls?.certChain === undefined
    ? "if the gateway asks for a client certificate (mutual TLS), this client gave none: pass" +
        " { tls: { rootCerts, privateKey, certChain } } with one its server.tls.client_ca_file trusts"
    : "if the gateway asks for a client certificate (mutual TLS), it did not take this client's: it must be issued" +
        " by a CA in the gateway's server.tls.client_ca_file";
}

/** What gRPC takes as a metadata key, in lower case (as it sends keys). */
const METADATA_KEY = /^[0-9a-z_.-]+$/;
/** What gRPC takes as the value of a key not ending -bin: printable ASCII, spaces too. */
const METADATA_TEXT = /^[ -~]*$/;
/**
 * The connection-specific headers of HTTP/1 that Node's http2 refuses to send (RFC 9113, 8.2.2): grpc-js then dropped
 * the connection, failing every call on it, and tried the call again at once, a core busy until its deadline. A "te"
 * of the caller's is no harm: grpc-js sends its own, "trailers".
 */
const CONNECTION_HEADERS = new Set([
  "connection",
  "keep-alive",
  "proxy-connection",
  "transfer-encoding",
  "upgrade",
  "http2-settings",
]);

/** What starts a key gRPC keeps for itself (grpc-status, grpc-timeout, ...), in lower case. */
const RESERVED_KEY_PREFIX = "grpc-";

/**
 * The metadata with its keys in lower case, as gRPC sends them; a TypeError for a key or a value gRPC refuses, or a
 * key gRPC reserves for itself (grpc-...), saying which key and never the value, which may be a key to the gateway
 * (read from a file with its newline, say): grpc-js threw its own Error, the value in its message, on every call. A
 * TypeError too for metadata that is no object of keys (a string, whose letters Object.entries reads as keys "0",
 * "1", ...), as the Python SDK refuses a string.
 */
function checkedMetadata(metadata: Record<string, unknown> | undefined): Record<string, string | Buffer> {
  if (
    metadata !== undefined &&
    metadata !== null &&
    (typeof metadata !== "object" || Array.isArray(metadata) || metadata instanceof Map)
  ) {
    // Its type, not its value: a string may be the caller's key.
    const kind = Array.isArray(metadata) ? "an array" : metadata instanceof Map ? "a Map" : `a ${typeof metadata}`;
    throw new TypeError(`metadata: an object of keys and values ({ authorization: "Bearer KEY" }), not ${kind}`);
  }
  const checked: Record<string, string | Buffer> = {};
  for (const [key, value] of Object.entries(metadata ?? {})) {
    const name = key.toLowerCase();
    if (!METADATA_KEY.test(name)) {
      throw new TypeError(
        `metadata key ${JSON.stringify(key)}: gRPC takes only letters, digits, '-', '_' and '.' in a key`,
      );
    }
    if (name.startsWith(RESERVED_KEY_PREFIX)) {
      // grpc-js sends it, where it has a meaning of gRPC's: a grpc-status failed the call INTERNAL, as though the
      // gateway had, and a client's grpc-timeout gave every call its deadline, after the upstream was asked.
      throw new TypeError(
        `metadata key ${JSON.stringify(key)}: keys starting grpc- are gRPC's own (reserved), not a caller's`,
      );
    }
    if (CONNECTION_HEADERS.has(name)) {
      throw new TypeError(
        `metadata key ${JSON.stringify(key)}: HTTP/2, which gRPC runs on, cannot send a connection-specific header` +
          ` (${[...CONNECTION_HEADERS].join(", ")})`,
      );
    }
    // A key ending -bin carries bytes; any other, printable ASCII.
    if (name.endsWith("-bin")) {
      if (!Buffer.isBuffer(value)) {
        throw new TypeError(`metadata "${name}": a key ending -bin takes a Buffer as its value (value not shown)`);
      }
    } else if (typeof value !== "string" || !METADATA_TEXT.test(value)) {
      throw new TypeError(`metadata "${name}": gRPC takes only printable ASCII text as a value (value not shown)`);
    }
    checked[name] = value as string | Buffer;
  }
  return checked;
}

/** A call after close(): CANCELLED, as the Python SDK says it, rather than grpc-js's plain Error. */
function closedError(): LLMRelayError {
  return new LLMRelayError(status.CANCELLED, "the client is closed: make a new one to call");
}

/**
 * grpc-js's INTERNAL for a request it could not encode (a field of the wrong type from plain JavaScript, such as a
 * role "user" where the contract's enum is a number), which no gateway ever saw: a TypeError saying so, not a
 * status that reads as the gateway's own failure.
 */
function unencodable(err: unknown): unknown {
  if (err instanceof LLMRelayError && err.code === status.INTERNAL && err.details.startsWith(SERIALIZATION_FAILURE)) {
    return new TypeError(
      `the request could not be encoded (${err.details}): a field has a value of the wrong type; an enum is` +
        " its number (Role.ROLE_USER, not \"user\"), a repeated field an array",
      { cause: err },
    );
  }
  return err;
}

const SERIALIZATION_FAILURE = "Request message serialization failure";

/**
 * `timeoutMs` if it is a deadline grpc-js can keep, else a RangeError that says what to give, or a TypeError for what
 * is no number: a string ("30000", from an environment variable) or true passed the comparisons, and every call then
 * failed with grpc-js's own error, or had a deadline of 1 ms.
 */
function checkedTimeout(timeoutMs: number | null): number | null {
  const what = `give a number of milliseconds > 0 and at most ${MAX_TIMEOUT_MS}, or null for no deadline`;
  if (timeoutMs !== null && typeof timeoutMs !== "number") {
    const type = typeof timeoutMs === "object" ? "an object" : `a ${typeof timeoutMs}`;
    throw new TypeError(`timeoutMs is ${type}: ${what}`);
  }
  if (timeoutMs !== null && !(timeoutMs > 0 && timeoutMs <= MAX_TIMEOUT_MS)) {
    throw new RangeError(`timeoutMs is ${timeoutMs}: ${what}`);
  }
  return timeoutMs;
}

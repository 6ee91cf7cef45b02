/**
 * Failed calls: the gRPC status with the google.rpc details the gateway attaches (AIP-193), decoded from the
 * `grpc-status-details-bin` trailer: ErrorInfo (why), RetryInfo (when a retry can help), BadRequest (which fields),
 * QuotaFailure (which limit), AttemptHistory (what the gateway tried).
 */
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";

import { BadRequest, ErrorInfo, QuotaFailure, RetryInfo } from "./gen/google/rpc/error_details";
import { Status } from "./gen/google/rpc/status";
import { AttemptHistory, ErrorReason, errorReasonFromJSON, type Attempt } from "./gen/llmrelay/v1/llmrelay";
import type { AgentResult } from "./agent";

/** The ErrorInfo domain of the gateway's own errors. */
export const DOMAIN = "llmrelay.dev";

/** The trailer that carries a google.rpc.Status with the details. */
export const STATUS_DETAILS_KEY = "grpc-status-details-bin";

/** The trailer of a call's request id in the gateway's log (the caller's own, when it sent a sane one). */
const REQUEST_ID_KEY = "x-request-id";

/** The name of a status code, such as "RESOURCE_EXHAUSTED". */
function codeName(code: status): string {
  return status[code] ?? String(code);
}

/** The ErrorInfo reason when the gateway set it, else "". */
function gatewayReason(errorInfo: ErrorInfo | undefined): string {
  return errorInfo?.domain === DOMAIN ? errorInfo.reason : "";
}

/** One invalid field of a request. */
export interface FieldViolation {
  /** The field's path, such as "messages" or "options.temperature". */
  field: string;
  description: string;
}

/** One limit a call ran into. */
export interface QuotaViolation {
  /** Whose limit: "key:NAME" or "gateway". */
  subject: string;
  /** Which limit; for a request that alone is larger than it, also what to change ("set max_tokens to at most N"). */
  description: string;
}

/** What a status carries beside its code and message. */
interface ErrorExtra {
  errorInfo?: ErrorInfo;
  retryInfo?: RetryInfo;
  badRequest?: BadRequest;
  quotaFailure?: QuotaFailure;
  attempts?: Attempt[];
  metadata?: Metadata;
  requestId?: string;
  /** What to try, added to the message (not from the gateway). */
  hint?: string;
}

/** A failed call. `reason` is the ErrorInfo reason, such as "UPSTREAM_RATE_LIMITED". */
export class LLMRelayError extends Error {
  override readonly name = "LLMRelayError";
  /** The gRPC status code (see `status` of @grpc/grpc-js). */
  readonly code: status;
  /** The status message, for people. */
  readonly details: string;
  /** The ErrorInfo, when the status has one. */
  readonly errorInfo: ErrorInfo | undefined;
  /** The RetryInfo: present when a retry can help. */
  readonly retryInfo: RetryInfo | undefined;
  /** The BadRequest, when the request was invalid. */
  readonly badRequest: BadRequest | undefined;
  /** The QuotaFailure, when the call ran into a limit (every <LIMIT>_EXCEEDED reason). */
  readonly quotaFailure: QuotaFailure | undefined;
  /** The attempts of a routed call that failed (the AttemptHistory detail), in order; [] without one. */
  readonly attempts: Attempt[];
  /** The response metadata (trailers) of the call. */
  readonly metadata: Metadata;
  /**
   * The call's id in the gateway's log (its x-request-id trailer), to quote to whoever runs the gateway; undefined
   * when no gateway answered, or the client refused the call itself.
   */
  readonly requestId: string | undefined;
  /**
   * Of an error that ended an Agent's run after at least one step: the run so far (its steps, usage and attempts, the
   * last answer), so that it can go on without running its tools again; as the Python SDK's `answer` and Go's
   * RunResult. Undefined otherwise.
   */
  result: AgentResult | undefined;

  constructor(
    code: status,
    details: string,
    private readonly extra: ErrorExtra = {},
  ) {
    const reason = gatewayReason(extra.errorInfo);
    super(`${codeName(code)}${reason ? ` (${reason})` : ""}: ${details}${extra.hint ? ` (${extra.hint})` : ""}`);
    this.code = code;
    this.details = details;
    this.errorInfo = extra.errorInfo;
    this.retryInfo = extra.retryInfo;
    this.badRequest = extra.badRequest;
    this.quotaFailure = extra.quotaFailure;
    this.attempts = extra.attempts ?? [];
    this.metadata = extra.metadata ?? new Metadata();
    this.requestId = extra.requestId;
  }

  /** The same error, its message ending with what a person may try. */
  withHint(hint: string): LLMRelayError {
    return new LLMRelayError(this.code, this.details, { ...this.extra, hint });
  }

  /** The status code's name, such as "RESOURCE_EXHAUSTED". */
  get codeName(): string {
    return codeName(this.code);
  }

  /** The ErrorInfo reason, such as "UPSTREAM_RATE_LIMITED"; "" without an ErrorInfo from the gateway. */
  get reason(): string {
    return gatewayReason(this.errorInfo);
  }

  /** The reason as the contract's enum (ERROR_REASON_UNSPECIFIED when absent or unknown to this version). */
  get errorReason(): ErrorReason {
    const value = errorReasonFromJSON(`ERROR_REASON_${this.reason || "UNSPECIFIED"}`);
    return value === ErrorReason.UNRECOGNIZED ? ErrorReason.ERROR_REASON_UNSPECIFIED : value;
  }

  /** The ErrorInfo metadata: what was tried, the upstream's status, ... */
  get errorMetadata(): Record<string, string> {
    return this.errorInfo?.metadata ?? {};
  }

  /** How long to wait before a retry, in milliseconds; undefined when a retry cannot help. */
  get retryDelayMs(): number | undefined {
    const delay = this.retryInfo?.retryDelay;
    return delay === undefined ? undefined : delay.seconds * 1000 + delay.nanos / 1e6;
  }

  /** The invalid fields of the request. */
  get fieldViolations(): FieldViolation[] {
    return (this.badRequest?.fieldViolations ?? []).map((v) => ({ field: v.field, description: v.description }));
  }

  /** The limits the call ran into: whose, which, and for a request that never fits what to change. */
  get quotaViolations(): QuotaViolation[] {
    return (this.quotaFailure?.violations ?? []).map((v) => ({ subject: v.subject, description: v.description }));
  }
}

function isServiceError(err: unknown): err is ServiceError {
  return (
    err instanceof Error &&
    typeof (err as Partial<ServiceError>).code === "number" &&
    (err as Partial<ServiceError>).metadata instanceof Metadata
  );
}

/**
 * Reads a failed call's status and its details. Returns undefined when `err` is not a gRPC error (an error of this
 * package's calls is already an LLMRelayError and comes back as it is).
 */
export function parseError(err: unknown): LLMRelayError | undefined {
  if (err instanceof LLMRelayError) {
    return err;
  }
  if (!isServiceError(err)) {
    return undefined;
  }
  const requestId = err.metadata.get(REQUEST_ID_KEY)[0];
  const extra: ErrorExtra = { metadata: err.metadata, requestId: typeof requestId === "string" ? requestId : undefined };
  const raw = err.metadata.get(STATUS_DETAILS_KEY)[0];
  if (raw instanceof Buffer) {
    readDetails(raw, extra);
  }
  return new LLMRelayError(err.code, err.details, extra);
}

/**
 * Adds to `extra` the details of a `grpc-status-details-bin` trailer. A trailer that is no google.rpc.Status (from a
 * proxy, say, or another server), or a detail that does not decode, is skipped: the call's code and message still
 * make its error. Thrown, the decode error escaped grpc-js's callback, and the call never settled.
 */
function readDetails(raw: Buffer, extra: ErrorExtra): void {
  let details: Status["details"];
  try {
    details = Status.decode(raw).details;
  } catch {
    return;
  }
  // The first detail of each type, as the Python and Go SDKs read them, where a status carries two (one added by a
  // proxy, say).
  for (const any of details) {
    // The message's name is what follows the URL's last "/", whatever its host (protobuf's Any rule, as the Python
    // and Go SDKs read it): a proxy may pack its details under a host of its own.
    const type = any.typeUrl.slice(any.typeUrl.lastIndexOf("/") + 1);
    try {
      if (type === "google.rpc.ErrorInfo") {
        extra.errorInfo ??= ErrorInfo.decode(any.value);
      } else if (type === "google.rpc.RetryInfo") {
        extra.retryInfo ??= RetryInfo.decode(any.value);
      } else if (type === "google.rpc.BadRequest") {
        extra.badRequest ??= BadRequest.decode(any.value);
      } else if (type === "google.rpc.QuotaFailure") {
        extra.quotaFailure ??= QuotaFailure.decode(any.value);
      } else if (type === "llmrelay.v1.AttemptHistory") {
        extra.attempts ??= AttemptHistory.decode(any.value).attempts;
      }
    } catch {
      // skipped: the details after it are still read
    }
  }
}

/** `parseError(err)`, or `err` itself when it is no gRPC error. */
export function toError(err: unknown): unknown {
  return parseError(err) ?? err;
}

/** The TypeScript client of the llmrelay gateway (llmrelay.v1 over gRPC). */
export {
  CALLER_HEADER,
  Client,
  DEFAULT_TARGET,
  DEFAULT_TIMEOUT_MS,
  assistant,
  system,
  user,
  type CallOptions,
  type ClientOptions,
  type CollectOptions,
  type CompleteInput,
  type CountTokensInput,
  type EmbedInput,
  type GetUsageInput,
  type MessageInput,
  type StreamInput,
} from "./client";
export { StreamAssembler, assemble, hasDelta, isRestart, type RestartChunk } from "./assemble";
export {
  functionTool,
  image,
  jsonSchema,
  userMessage,
  type ContentPartInput,
  type ImageOptions,
  type ResponseFormatInput,
  type SchemaOptions,
  type ToolInput,
} from "./content";
export { DOMAIN, LLMRelayError, STATUS_DETAILS_KEY, parseError, type FieldViolation } from "./errors";
export * from "./gen/llmrelay/v1/llmrelay";
export { BadRequest, ErrorInfo, RetryInfo } from "./gen/google/rpc/error_details";
export { Status } from "./gen/google/rpc/status";

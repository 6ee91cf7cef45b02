/** The TypeScript client of the llmrelay gateway (llmrelay.v1 over gRPC). */
export {
  CALLER_HEADER,
  Client,
  DEFAULT_TARGET,
  DEFAULT_TIMEOUT_MS,
  MAX_TIMEOUT_MS,
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
export {
  Agent,
  DEFAULT_MAX_STEPS,
  MAX_TOOL_TIMEOUT_MS,
  StepLimitError,
  addUsage,
  tool,
  type AgentOptions,
  type AgentResult,
  type AgentTool,
  type RunOptions,
  type ToolContext,
  type ToolSpec,
} from "./agent";
export {
  ContextBudgetError,
  Conversation,
  toolMessage,
  type ConversationOptions,
  type CountOptions,
  type FitResult,
} from "./conversation";
export { s, type Infer, type JsonSchemaObject, type Schema } from "./schema";
export {
  chooseTransport,
  isLoopbackTarget,
  type TlsOptions,
  type Transport,
  type TransportOptions,
} from "./tls";
export {
  DOMAIN,
  LLMRelayError,
  STATUS_DETAILS_KEY,
  parseError,
  type FieldViolation,
  type QuotaViolation,
} from "./errors";
export * from "./gen/llmrelay/v1/llmrelay";
export { BadRequest, ErrorInfo, QuotaFailure, RetryInfo } from "./gen/google/rpc/error_details";
export { Status } from "./gen/google/rpc/status";
export { SERVICE_CONFIG_JSON } from "./gen/llmrelay/v1/service_config";
// What callers of this package need from @grpc/grpc-js without depending on it themselves: the status codes an
// LLMRelayError's code is one of, its trailers, and what ClientOptions takes.
export {
  ChannelCredentials,
  InterceptingCall,
  Metadata,
  status,
  type ChannelOptions,
  type Interceptor,
} from "@grpc/grpc-js";

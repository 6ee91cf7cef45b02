/**
 * Builders for what goes into a request beyond plain text: tools and JSON schemas (sent as JSON text), and images.
 */
import {
  ResponseFormatType,
  Role,
  type CompletionOptions,
  type ContentPart,
  type DeepPartial,
  type ImageDetail,
  type ResponseFormat,
  type Tool,
} from "./gen/llmrelay/v1/llmrelay";
import type { MessageInput } from "./client";
import { isSchema, type Schema } from "./schema";

export type ToolInput = DeepPartial<Tool>;
export type ResponseFormatInput = DeepPartial<ResponseFormat>;
export type ContentPartInput = DeepPartial<ContentPart>;

export interface SchemaOptions {
  /** What the function does, or what the answer is for. */
  description?: string;
  /** Whether the model must follow the schema exactly (where the upstream supports it). */
  strict?: boolean;
}

export interface ImageOptions {
  /** image/png, image/jpeg, image/gif or image/webp; unset, the gateway reads it from the bytes. */
  mediaType?: string;
  /** How closely the model looks: ImageDetail.IMAGE_DETAIL_LOW costs the fewest tokens. */
  detail?: ImageDetail;
}

/** A JSON Schema: a schema from `s` (its JSON Schema is sent), an object, or JSON text. */
export type SchemaInput = Schema<unknown, boolean> | object | string;

/**
 * A function the model may call; `parameters` is its JSON Schema: a schema from `s`, an object, or JSON text. It is
 * sent as JSON text (`parametersJson`), which the upstream gets as written.
 */
export function functionTool(name: string, parameters?: SchemaInput, options: SchemaOptions = {}): ToolInput {
  const schema = parameters === undefined ? {} : { parametersJson: jsonText(parameters) };
  return { function: { name, ...options, ...schema } };
}

/** The response format of an answer that is JSON following `schema` (a schema from `s`, an object, or JSON text). */
export function jsonSchema(name: string, schema: SchemaInput, options: SchemaOptions = {}): ResponseFormatInput {
  return {
    type: ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
    jsonSchema: { name, ...options, schemaJson: jsonText(schema) },
  };
}

/** An image for userMessage: its bytes (PNG, JPEG, GIF or WebP), or an http(s) URL the upstream fetches. */
export function image(source: Uint8Array | string, options: ImageOptions = {}): ContentPartInput {
  const { mediaType, detail } = options;
  const where =
    typeof source === "string"
      ? { url: source }
      : { data: Buffer.from(source.buffer, source.byteOffset, source.byteLength), mediaType };
  return { image: { ...where, detail } };
}

/** A user message of texts and images, in order: `userMessage("What is in this?", image(png))`. */
export function userMessage(...content: (string | ContentPartInput)[]): MessageInput {
  return { role: Role.ROLE_USER, parts: content.map((item) => (typeof item === "string" ? { text: item } : item)) };
}

/**
 * The options, every schema given as an object turned into JSON text (`parametersJson`, `schemaJson`): the
 * deprecated Struct fields it would otherwise fill turn integers into doubles (`maxItems: 3` into 3.0). A `stop`
 * given as one string (from plain JavaScript) is that one sequence.
 */
export function withJsonText(
  options: DeepPartial<CompletionOptions> | undefined,
): DeepPartial<CompletionOptions> | undefined {
  if (!options) {
    return options;
  }
  // One stop sequence as a string, from plain JavaScript, as OpenAI and the Python SDK take it (not one a character).
  const stop: unknown = options.stop;
  return {
    ...options,
    ...(typeof stop === "string" ? { stop: [stop] } : {}),
    tools: textTools(options.tools),
    responseFormat: textFormat(options.responseFormat),
  };
}

/** The tools, parameters given as an object turned into JSON text. */
export function textTools(tools: ToolInput[] | undefined): ToolInput[] | undefined {
  return tools?.map((tool) => {
    const fn = tool.function;
    if (fn?.parameters === undefined || fn.parametersJson !== undefined) {
      return tool;
    }
    const { parameters, ...rest } = fn;
    return { ...tool, function: { ...rest, parametersJson: jsonText(parameters) } };
  });
}

/** The response format, its schema given as an object turned into JSON text. */
export function textFormat(format: ResponseFormatInput | undefined): ResponseFormatInput | undefined {
  const schema = format?.jsonSchema;
  if (schema?.schema === undefined || schema.schemaJson !== undefined) {
    return format;
  }
  const { schema: value, ...rest } = schema;
  return { ...format, jsonSchema: { ...rest, schemaJson: jsonText(value) } };
}

/** The JSON text of a schema: text as it is; a schema from `s` its JSON Schema (not the builder's own fields). */
function jsonText(schema: SchemaInput): string {
  return typeof schema === "string" ? schema : JSON.stringify(isSchema(schema) ? schema.json : schema);
}

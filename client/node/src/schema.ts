/**
 * A tiny JSON Schema builder in the style of zod, for tool parameters: each builder gives the JSON Schema the model
 * sees, and TypeScript infers the arguments' type from it.
 *
 * ```ts
 * const weather = s.object({
 *   city: s.string().describe("The city, in English"),
 *   unit: s.enum(["celsius", "fahrenheit"]).optional(),
 * });
 * type Weather = Infer<typeof weather>; // { city: string; unit?: "celsius" | "fahrenheit" }
 * ```
 *
 * It describes; it does not validate (the tool loop parses the model's arguments as JSON and hands them over).
 */

/** A JSON Schema, as an object. */
export type JsonSchemaObject = { [key: string]: unknown };

/** A schema of values of type T; `Optional` marks an object property that may be left out. */
export interface Schema<T, Optional extends boolean = false> {
  /** The JSON Schema. */
  readonly json: JsonSchemaObject;
  /** Whether, as a property of s.object, it may be left out. */
  readonly isOptional: Optional;
  /** Only for type inference: never set. */
  readonly __type?: T;
  /** The same schema with a description, for the model. */
  describe(description: string): Schema<T, Optional>;
  /** The same schema as a property that may be left out. */
  optional(): Schema<T, true>;
}

/** The type of the values a schema describes. */
export type Infer<S> = S extends Schema<infer T, boolean> ? T : never;

// Any schema, whatever it describes.
type AnySchema = Schema<any, boolean>;
type Shape = { [key: string]: AnySchema };
type Flatten<T> = { [K in keyof T]: T[K] } & {};
type ObjectOf<S extends Shape> = Flatten<
  { [K in keyof S as S[K]["isOptional"] extends true ? never : K]: Infer<S[K]> } & {
    [K in keyof S as S[K]["isOptional"] extends true ? K : never]?: Infer<S[K]>;
  }
>;

function schema<T, Optional extends boolean = false>(
  json: JsonSchemaObject,
  isOptional: Optional = false as Optional,
): Schema<T, Optional> {
  return {
    json,
    isOptional,
    describe: (description) => schema<T, Optional>({ ...json, description }, isOptional),
    optional: () => schema<T, true>(json, true),
  };
}

/** The builders: s.string(), s.number(), s.integer(), s.boolean(), s.enum([...]), s.array(item), s.object({...}). */
export const s = {
  string: (): Schema<string> => schema({ type: "string" }),
  number: (): Schema<number> => schema({ type: "number" }),
  integer: (): Schema<number> => schema({ type: "integer" }),
  boolean: (): Schema<boolean> => schema({ type: "boolean" }),
  /** One of these strings. */
  enum: <const V extends readonly [string, ...string[]]>(values: V): Schema<V[number]> =>
    schema({ type: "string", enum: [...values] }),
  array: <T>(items: Schema<T, boolean>): Schema<T[]> => schema({ type: "array", items: items.json }),
  /** An object with these properties, required unless marked .optional(), and no others. */
  object: <S extends Shape>(shape: S): Schema<ObjectOf<S>> => {
    const properties = Object.fromEntries(Object.entries(shape).map(([key, value]) => [key, value.json]));
    const required = Object.keys(shape).filter((key) => !shape[key]!.isOptional);
    return schema({ type: "object", properties, required, additionalProperties: false });
  },
};

/** Whether a tool's parameters are a builder's schema (else a JSON Schema object or text). */
export function isSchema(value: unknown): value is AnySchema {
  return typeof value === "object" && value !== null && "json" in value && "isOptional" in value;
}

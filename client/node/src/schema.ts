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
 * Each schema also checks a value against what it describes (`check`): the agent loop answers a call whose
 * arguments do not fit with an error result that says what is wrong, for the model to correct, and never runs the
 * tool with them, so that a tool's arguments are of the type `Infer` gives.
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
  /**
   * What is wrong with a value (parsed JSON) for this schema, each problem with the path to where it is
   * (`days[1]: expected an integer, got 1.5`) after `path` (the value's own, "" for the arguments themselves); none
   * when the value fits.
   */
  check(value: unknown, path?: string): string[];
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

/** Checks a value at a path (see Schema.check). */
type Check = (value: unknown, path: string) => string[];

function schema<T, Optional extends boolean = false>(
  json: JsonSchemaObject,
  check: Check,
  isOptional: Optional = false as Optional,
): Schema<T, Optional> {
  return {
    json,
    isOptional,
    check: (value, path = "") => check(value, path),
    describe: (description) => schema<T, Optional>({ ...json, description }, check, isOptional),
    optional: () => schema<T, true>(json, check, true),
  };
}

/** A problem at a path: "city: expected a string, got a number", or the bare problem at the top. */
function at(path: string, problem: string): string {
  return path === "" ? problem : `${path}: ${problem}`;
}

/** What a JSON value is, for a problem's "got ...": its kind ("a string", "null"), a number that is not finite itself. */
function kindOf(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  switch (typeof value) {
    case "string":
      return "a string";
    case "number":
      return Number.isFinite(value) ? "a number" : String(value); // 1e400, which JSON.parse reads as Infinity
    case "boolean":
      return "a boolean";
    case "object":
      return "an object";
    default:
      return `a ${typeof value}`; // not from JSON.parse, but check() may be given anything
  }
}

/** A check that the value is a JSON value of one kind, and, when it is, passes `also`. */
function kind(expected: string, is: (value: unknown) => boolean, also: Check = () => []): Check {
  return (value, path) => (is(value) ? also(value, path) : [at(path, `expected ${expected}, got ${kindOf(value)}`)]);
}

/** A property name as a problem gives it: as it is when it reads plainly, else as a JSON string. */
function propertyPath(path: string, key: string): string {
  const name = /^[A-Za-z_$][\w$-]*$/.test(key) ? key : JSON.stringify(key);
  return path === "" ? name : `${path}.${name}`;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

// JSON.parse reads 1e400 as Infinity, which no tool can use as a number.
const isNumber = (value: unknown): value is number => typeof value === "number" && Number.isFinite(value);

/** The builders: s.string(), s.number(), s.integer(), s.boolean(), s.enum([...]), s.array(item), s.object({...}). */
export const s = {
  string: (): Schema<string> => schema({ type: "string" }, kind("a string", (v) => typeof v === "string")),
  number: (): Schema<number> => schema({ type: "number" }, kind("a number", isNumber)),
  /** A whole number a JavaScript number holds exactly (up to 2^53 - 1 in size): take a 64-bit id as s.string(). */
  integer: (): Schema<number> =>
    schema(
      { type: "integer" },
      kind("an integer", isNumber, (value, path) => {
        if (!Number.isInteger(value)) {
          return [at(path, `expected an integer, got ${String(value)}`)];
        }
        // Past 2^53 JSON.parse has rounded it already (9007199254740993 read as ...992): a tool would act on another
        // integer than the model's (an id), so it is refused rather than passed on.
        if (Number.isSafeInteger(value)) {
          return [];
        }
        const about = (value as number).toPrecision(4);
        return [at(path, `expected an integer a number holds exactly (at most 2^53 - 1 in size), got about ${about}`)];
      }),
    ),
  boolean: (): Schema<boolean> => schema({ type: "boolean" }, kind("a boolean", (v) => typeof v === "boolean")),
  /** One of these strings. */
  enum: <const V extends readonly [string, ...string[]]>(values: V): Schema<V[number]> => {
    const allowed: readonly string[] = values;
    const list = allowed.map((v) => JSON.stringify(v)).join(", ");
    const check = (value: unknown, path: string) => {
      if (typeof value === "string" && allowed.includes(value)) {
        return [];
      }
      const got = typeof value === "string" ? JSON.stringify(value) : kindOf(value);
      return [at(path, `expected one of ${list}, got ${got}`)];
    };
    return schema({ type: "string", enum: [...values] }, check);
  },
  array: <T>(items: Schema<T, boolean>): Schema<T[]> =>
    schema(
      { type: "array", items: items.json },
      kind("an array", Array.isArray, (value, path) =>
        (value as unknown[]).flatMap((item, i) => items.check(item, `${path}[${i}]`)),
      ),
    ),
  /** An object with these properties, required unless marked .optional(), and no others. */
  object: <S extends Shape>(shape: S): Schema<ObjectOf<S>> => {
    const properties = Object.fromEntries(Object.entries(shape).map(([key, value]) => [key, value.json]));
    const required = Object.keys(shape).filter((key) => !shape[key]!.isOptional);
    const names = Object.keys(shape);
    const known = names.length === 0 ? "it takes none" : `the properties are: ${names.join(", ")}`;
    // Every problem at once, so that the model can correct them in one call.
    const check = kind("an object", isPlainObject, (value, path) => {
      const object = value as Record<string, unknown>;
      const problems = required
        .filter((key) => !Object.hasOwn(object, key))
        .map((key) => at(path, `the required property ${JSON.stringify(key)} is missing`));
      for (const [key, property] of Object.entries(object)) {
        const member = Object.hasOwn(shape, key) ? shape[key] : undefined;
        problems.push(
          ...(member === undefined
            ? [at(path, `there is no property ${JSON.stringify(key)} (${known})`)]
            : member.check(property, propertyPath(path, key))),
        );
      }
      return problems;
    });
    return schema({ type: "object", properties, required, additionalProperties: false }, check);
  },
};

/** Whether a tool's parameters are a builder's schema (else a JSON Schema object or text). */
export function isSchema(value: unknown): value is AnySchema {
  return typeof value === "object" && value !== null && "json" in value && "isOptional" in value;
}

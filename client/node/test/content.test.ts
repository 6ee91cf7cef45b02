/**
 * Schemas as JSON text and images in messages, end to end: the builders and the plain-object forms, through the real
 * gateway to the fake OpenAI upstream.
 */
import assert from "node:assert/strict";
import { deflateSync } from "node:zlib";
import { after, before, describe, test } from "node:test";

import { status } from "@grpc/grpc-js";

import {
  Client,
  ImageDetail,
  LLMRelayError,
  ResponseFormatType,
  Role,
  functionTool,
  image,
  jsonSchema,
  s,
  user,
  userMessage,
} from "../src";
import { Gateway, type Upstream } from "./gateway";

const CAT_URL = "https://example.com/cat.png";
const SCHEMA = {
  type: "object",
  properties: {
    tags: { type: "array", maxItems: 3, items: { type: "array", items: { type: "integer", default: 10 } } },
    ratio: { type: "number", maximum: 1.5 },
  },
};

let upstream: Upstream;
let gateway: Gateway;
let client: Client;

before(async () => {
  // With a second backend: Ollama's /v1 takes no image by URL, so the gateway sends such a chat on to it.
  gateway = await Gateway.start({ fallback: true });
  upstream = gateway.upstream;
  client = new Client(gateway.addr, { timeoutMs: 30_000 });
});

after(async () => {
  client?.close();
  await gateway?.stop();
});

/** The last chat request the upstream received: its JSON text, and what it says. */
async function lastRequest(): Promise<{ text: string; body: any }> {
  const text = await upstream.requests();
  const bodies = JSON.parse(text) as unknown[];
  // The list's last element is the last request; its text is the list's from its last `{"model"` on.
  return { text: text.slice(text.lastIndexOf('{"model"')), body: bodies.at(-1) };
}

/** A valid PNG of the size: black, 8-bit greyscale. */
function png(width: number, height: number): Uint8Array {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) {
      c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    }
    return c >>> 0;
  });
  const crc = (bytes: Buffer) => {
    let c = 0xffffffff;
    for (const byte of bytes) {
      c = crcTable[(c ^ byte) & 0xff]! ^ (c >>> 8);
    }
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (kind: string, data: Buffer) => {
    const head = Buffer.alloc(4);
    head.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(kind, "latin1"), data]);
    const tail = Buffer.alloc(4);
    tail.writeUInt32BE(crc(body));
    return Buffer.concat([head, body, tail]);
  };
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header[8] = 8; // bit depth; colour type, compression, filter and interlace stay 0
  const rows = Buffer.alloc((width + 1) * height); // each row: filter type 0, then its pixels
  const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  return Buffer.concat([
    signature,
    chunk("IHDR", header),
    chunk("IDAT", deflateSync(rows)),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

describe("schemas and images, from TypeScript", { concurrency: false }, () => {
  test("functionTool and jsonSchema send the schema as JSON text, integers as integers", async () => {
    await client.complete({
      messages: [user("tag this")],
      options: {
        tools: [functionTool("tag", SCHEMA, { description: "Tags it" })],
        responseFormat: jsonSchema("tags", SCHEMA),
      },
    });
    const { text, body } = await lastRequest();
    assert.match(text, /"maxItems": 3,/);
    assert.match(text, /"default": 10\}/);
    assert.doesNotMatch(text, /"maxItems": 3\.0/);
    assert.deepEqual(body.tools[0].function, { name: "tag", description: "Tags it", parameters: SCHEMA });
    assert.deepEqual(body.response_format.json_schema, { name: "tags", schema: SCHEMA });
  });

  test("schemas given as plain objects go as JSON text too", async () => {
    await client.complete({
      messages: [user("tag this")],
      options: {
        tools: [{ function: { name: "tag", parameters: SCHEMA } }],
        responseFormat: {
          type: ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
          jsonSchema: { name: "tags", schema: SCHEMA },
        },
      },
    });
    const { text, body } = await lastRequest();
    assert.equal(text.match(/"maxItems": 3,/g)?.length, 2, text);
    assert.doesNotMatch(text, /"maxItems": 3\.0/);
    assert.deepEqual(body.tools[0].function.parameters, SCHEMA);
    const tools = [{ function: { name: "tag", parameters: SCHEMA } }];
    const count = await client.countTokens({ messages: [user("tag this")], tools });
    assert.ok(count.tokenCount > 0);
  });

  test("a schema from s is sent as its JSON Schema, not as the builder", async () => {
    // The builder's own fields went as the schema: {"json":{...},"isOptional":false}.
    const weather = s.object({ city: s.string(), days: s.integer().optional() });
    const answer = s.object({ ok: s.boolean() });
    const tool = functionTool("get_weather", weather);
    const format = jsonSchema("answer", answer);
    assert.equal(tool.function?.parametersJson, JSON.stringify(weather.json));
    assert.equal(format.jsonSchema?.schemaJson, JSON.stringify(answer.json));
    // In plain objects too, which TypeScript takes.
    await client.complete({
      messages: [user("weather")],
      options: {
        tools: [{ function: { name: "get_weather", parameters: weather } }],
        responseFormat: {
          type: ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
          jsonSchema: { name: "answer", schema: answer },
        },
      },
    });
    const { body } = await lastRequest();
    assert.deepEqual(body.tools[0].function.parameters, weather.json);
    assert.deepEqual(body.response_format.json_schema.schema, answer.json);
  });

  test("userMessage sends images from bytes and URLs as image_url parts", async () => {
    const bytes = png(4, 3);
    const answer = await client.complete({
      messages: [userMessage("compare", image(bytes, { detail: ImageDetail.IMAGE_DETAIL_LOW }), image(CAT_URL))],
    });
    assert.equal(answer.message?.content, "echo: compare");
    assert.equal(answer.backend, "fallback"); // the harness's second backend, an OpenAI-compatible one
    const { body } = await lastRequest();
    assert.deepEqual(body.messages[0].content, [
      { type: "text", text: "compare" },
      {
        type: "image_url",
        image_url: { url: `data:image/png;base64,${Buffer.from(bytes).toString("base64")}`, detail: "low" },
      },
      { type: "image_url", image_url: { url: CAT_URL } },
    ]);
  });

  test("an image in an assistant message is INVALID_ARGUMENT naming the part", async () => {
    const message = { ...userMessage(image(CAT_URL)), role: Role.ROLE_ASSISTANT };
    await assert.rejects(client.complete({ messages: [user("hi"), message] }), (err: unknown) => {
      assert.ok(err instanceof LLMRelayError);
      assert.equal(err.codeName, status[status.INVALID_ARGUMENT]);
      assert.deepEqual(err.fieldViolations.map((v) => v.field), ["messages[1].parts[0].image"]);
      return true;
    });
  });
});

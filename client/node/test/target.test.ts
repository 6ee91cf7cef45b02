/**
 * Unit tests, without a server, of the targets the client refuses when it is made, as the Python SDK refuses them
 * (tests/unit/sdk/test_channel.py) and the Go SDK (client/go/llmrelay/target_test.go), and of what util.inspect shows
 * of a client made with the caller's key: none of it.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import net from "node:net";
import util from "node:util";

import { Server, ServerCredentials } from "@grpc/grpc-js";

import { Agent, Client, LLMServiceService, user } from "../src";

describe("the target", () => {
  // grpc-js took it, and every call failed UNAVAILABLE with a hint to switch TLS on or off, which did not help.
  for (const target of ["https://host:1", "http://x", "http://127.0.0.1:1", "HTTPS://user:secret@llm.example.com"]) {
    test(`${target} is refused, unechoed: a URL is no gRPC target`, () => {
      for (const options of [{}, { insecure: true }]) {
        assert.throws(
          () => new Client(target, options),
          (err: unknown) => {
            assert.ok(err instanceof Error && !(err instanceof TypeError));
            assert.equal(
              err.message,
              "target: a gRPC target is HOST:PORT (or dns:, unix:, ...), not an http:// or https:// URL",
            );
            return true;
          },
        );
      }
    });
  }

  // gRPC's core (the Python SDK's) takes such a port modulo 65536: another server's, which got the caller's key.
  for (const target of [
    "127.0.0.1:92805",
    "[::1]:70000",
    "dns:///gw.example:65536",
    "dns://8.8.8.8/gw.example:99999",
    "ipv4:127.0.0.1:1,127.0.0.1:70000",
    "127.0.0.1:99999999999999999999999",
  ]) {
    test(`${target} is refused: its port is past 65535`, () => {
      assert.throws(() => new Client(target, { insecure: true }), {
        name: "Error",
        message: "target: its port is not a number from 0 to 65535",
      });
    });
  }

  test("a target whose ports are in range, or that has none, is taken", () => {
    for (const target of [
      "127.0.0.1:65535",
      "[::1]:1",
      "dns:///gw.example:443",
      "dns://8.8.8.8:53/gw.example:443",
      "unix:/run/llmrelay:70000",
      "::1",
      "gw",
      "localhost:http",
    ]) {
      const client = new Client(target, { insecure: true });
      assert.equal(client.target, target);
      client.close();
    }
  });
});

describe("util.inspect", () => {
  test("shows no value of the client's metadata, of the client or of an Agent holding it", () => {
    const secret = "sk-SECRET-123";
    const client = new Client("127.0.0.1:1", {
      metadata: { authorization: `Bearer ${secret}` },
      caller: `ci-${secret}`,
    });
    try {
      const agent = new Agent(client, { tools: [] });
      for (const value of [client, agent, { client }, [client]]) {
        for (const options of [{}, { depth: Infinity, showHidden: true }]) {
          const text = util.inspect(value, options);
          assert.ok(!text.includes(secret), text);
        }
        assert.ok(!util.format("%o %O %s", value, value, value).includes(secret));
      }
      assert.ok(!JSON.stringify(Object.entries(client)).includes(secret));
    } finally {
      client.close();
    }
  });
  test("shows none of it with calls in flight either, which hold their metadata", async () => {
    const secret = "sk-SECRET-456";
    const server = new Server();
    let arrived!: () => void;
    const bothArrived = new Promise<void>((resolve) => {
      let count = 0;
      arrived = () => (++count === 2 ? resolve() : undefined);
    });
    // It never answers.
    server.addService(LLMServiceService, { complete: () => arrived(), streamComplete: () => arrived() });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (err, bound) =>
        err ? reject(err) : resolve(bound),
      ),
    );
    const client = new Client(`127.0.0.1:${port}`, { metadata: { authorization: `Bearer ${secret}` } });
    try {
      const unary = client.complete({ messages: [user("hi")] }).catch(() => undefined);
      const stream = client.stream({ messages: [user("hi")] }).next().catch(() => undefined);
      await bothArrived;
      for (const value of [client, new Agent(client, { tools: [] })]) {
        const text = util.inspect(value, { depth: Infinity, showHidden: true });
        assert.ok(!text.includes(secret), "util.inspect shows the key of a call in flight");
      }
      client.close();
      await Promise.all([unary, stream]);
    } finally {
      client.close();
      server.forceShutdown();
    }
  });
  test("shows none of it while a call waits for its connection, which holds the call's metadata", async () => {
    // A server that takes the connection and never speaks HTTP/2: the calls wait in the channel's queue, as they do
    // while any gateway is connected to. grpc-js's client, the public `raw`, reached them and their metadata.
    const secret = "sk-SECRET-789";
    const sockets = new Set<net.Socket>();
    let connected!: () => void;
    const connection = new Promise<void>((resolve) => (connected = resolve));
    const server = net.createServer((socket) => {
      sockets.add(socket.on("error", () => {}));
      connected();
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const { port } = server.address() as net.AddressInfo;
    const client = new Client(`127.0.0.1:${port}`, { metadata: { authorization: `Bearer ${secret}` } });
    try {
      const unary = client.complete({ messages: [user("hi")] }).catch(() => undefined);
      const stream = client.stream({ messages: [user("hi")] }).next().catch(() => undefined);
      await connection;
      for (const value of [client, new Agent(client, { tools: [] })]) {
        const text = util.inspect(value, { depth: Infinity, showHidden: true });
        assert.ok(!text.includes(secret), "util.inspect shows the key of a call waiting for its connection");
      }
      // `raw` is still there, for what the client does not wrap.
      assert.equal(typeof client.raw.complete, "function");
      client.close();
      await Promise.all([unary, stream]);
    } finally {
      client.close();
      sockets.forEach((socket) => socket.destroy());
      server.close();
    }
  });
});

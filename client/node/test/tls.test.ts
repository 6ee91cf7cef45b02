/** Unit tests of the transport rule (plaintext to loopback only, TLS otherwise), without a server. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { ChannelCredentials, Client, chooseTransport, isLoopbackTarget, type TransportOptions } from "../src";

describe("isLoopbackTarget", () => {
  const cases: [string, boolean][] = [
    ["127.0.0.1:50051", true],
    ["127.0.0.1", true],
    ["127.8.9.10:443", true],
    ["localhost:50051", true],
    ["LOCALHOST:50051", true],
    ["localhost", true],
    ["localhost.:50051", true],
    ["[::1]:50051", true],
    ["::1", true],
    ["[::ffff:127.0.0.1]:50051", true],
    ["dns:///localhost:50051", true],
    ["dns:///127.0.0.1:50051", true],
    ["dns://8.8.8.8/localhost:50051", true],
    ["dns:localhost:50051", true],
    ["dns:///[::1]:50051", true],
    ["passthrough:///127.0.0.1:50051", true],
    ["ipv4:127.0.0.1:50051,127.0.0.2:50051", true],
    ["ipv6:[::1]:50051", true],
    ["unix:/run/llmrelay.sock", true],
    ["unix:///run/llmrelay.sock", true],
    ["unix-abstract:llmrelay", true],
    // Not loopback: TLS.
    ["gateway.example.com:443", false],
    ["dns:///gateway.example.com:443", false],
    ["dns://127.0.0.1/gateway.example.com:443", false],
    ["dns://127.0.0.1", false],
    ["10.0.0.5:50051", false],
    ["0.0.0.0:50051", false],
    ["128.0.0.1:50051", false],
    ["127.0.0.256:50051", false],
    ["127.0.0.1.example.com:50051", false],
    ["localhost.example.com:50051", false],
    ["[::2]:50051", false],
    ["ipv4:127.0.0.1:50051,10.0.0.5:50051", false],
    ["xds:///llmrelay", false],
    ["", false],
  ];
  for (const [target, loopback] of cases) {
    test(`${JSON.stringify(target)} is ${loopback ? "" : "not "}loopback`, () => {
      assert.equal(isLoopbackTarget(target), loopback);
    });
  }
});

describe("chooseTransport", () => {
  const ca = "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n";
  const cases: [string, TransportOptions, "plaintext" | "tls"][] = [
    ["127.0.0.1:50051", {}, "plaintext"],
    ["gateway.example.com:443", {}, "tls"],
    ["127.0.0.1:50051", { insecure: false }, "tls"],
    ["127.0.0.1:50051", { tls: { rootCerts: ca } }, "tls"],
    ["gateway.internal:50051", { insecure: true }, "plaintext"],
    ["gateway.example.com:443", { tls: { rootCerts: ca } }, "tls"],
  ];
  for (const [target, options, transport] of cases) {
    test(`${target} with ${JSON.stringify(options)}: ${transport}`, () => {
      assert.equal(chooseTransport(target, options), transport);
    });
  }

  test("insecure with tls is a contradiction, said so", () => {
    assert.throws(
      () => chooseTransport("127.0.0.1:50051", { insecure: true, tls: { rootCerts: ca } }),
      /insecure: true and tls contradict/,
    );
  });

});

describe("Client's transport", () => {
  // A Client connects on its first call: making one here opens nothing.
  test("follows the rule, and credentials given by the caller decide alone", () => {
    const clients = [
      new Client("127.0.0.1:50051"),
      new Client("gateway.example.com:443"),
      new Client("gateway.example.com:443", { credentials: ChannelCredentials.createInsecure() }),
    ];
    assert.deepEqual(
      clients.map((client) => client.transport),
      ["plaintext", "tls", undefined],
    );
    clients.forEach((client) => client.close());
  });

  test("mutual TLS needs both the key and the certificate", () => {
    assert.throws(
      () => new Client("gateway.example.com:443", { tls: { privateKey: "KEY" } }),
      /needs both privateKey and certChain/,
    );
  });
});

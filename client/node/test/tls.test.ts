/** Unit tests of the transport rule (plaintext to loopback only, TLS otherwise), without a server. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { ChannelCredentials, Client, chooseTransport, isLoopbackTarget, type TransportOptions } from "../src";
import { closedWithoutAWord } from "../src/tls";

describe("isLoopbackTarget", () => {
  // The transport rule's table, the same rows as the Go SDK's (client/go/llmrelay/transport_test.go) and the Python
  // SDK's (tests/unit/sdk/test_channel.py): change the three together. A host is loopback when the language's strict
  // parser reads it as an address in 127.0.0.0/8, ::1 or ::ffff:127.0.0.0/104 (any spelling), or when it is
  // "localhost"; anything the parser refuses (leading zeros, 127.1, hex) is a name, and gets TLS.
  const cases: [string, boolean][] = [
    ["127.0.0.1:50051", true],
    ["127.0.0.1", true],
    ["127.45.6.7:443", true], // all of 127.0.0.0/8
    ["127.255.255.255:1", true],
    ["localhost:50051", true],
    ["LocalHost:50051", true],
    ["localhost", true],
    ["localhost.:50051", true],
    ["[::1]:50051", true],
    ["::1", true],
    ["[0::1]:50051", true],
    ["[0:0:0:0:0:0:0:1]:50051", true],
    ["[::0001]:50051", true],
    ["[::1%lo]:50051", true],
    ["[::ffff:127.0.0.1]:50051", true], // IPv4-mapped 127.0.0.1, in every spelling
    ["[::ffff:7f00:1]:50051", true],
    ["[::FFFF:127.1.2.3]:50051", true],
    ["[0:0:0:0:0:ffff:7f00:1]:50051", true],
    ["::ffff:127.0.0.1", true],
    ["dns:///localhost:50051", true],
    ["dns:///127.0.0.1:50051", true],
    ["dns:localhost:50051", true],
    ["dns://8.8.8.8/localhost:50051", true], // the authority is the DNS server, not the gateway
    ["DNS:///[::1]:50051", true],
    ["dns:///[::ffff:127.0.0.1]:50051", true],
    ["passthrough:///127.0.0.1:50051", true],
    ["passthrough:///localhost:50051", true],
    ["ipv4:127.0.0.1:50051,127.0.0.2:50052", true],
    ["ipv6:[::1]:50051", true],
    ["ipv6:[::ffff:7f00:1]:50051", true],
    ["unix:/run/llmrelay.sock", true],
    ["unix:///run/llmrelay.sock", true],
    ["unix-abstract:llmrelay", true],
    ["127.000.000.001:50051", false], // leading zeros: not an address to the strict parsers, so a name
    ["127.1:50051", false],
    ["0x7f.0.0.1:50051", false],
    ["0177.0.0.1:50051", false],
    ["127.0.0.256:50051", false],
    ["[::ffff:128.0.0.1]:50051", false],
    ["[::127.0.0.1]:50051", false], // IPv4-compatible, not IPv4-mapped
    ["[::ffff:0:127.0.0.1]:50051", false], // IPv4-translated, not IPv4-mapped
    ["[::2]:50051", false],
    ["[::]:50051", false],
    ["[fe80::1%eth0]:50051", false],
    ["0.0.0.0:50051", false],
    ["10.0.0.5:50051", false],
    ["128.0.0.1:50051", false],
    ["[2001:db8::1]:50051", false],
    ["gateway.example.com:443", false],
    ["gateway.example.com", false],
    ["localhost.example.com:50051", false],
    ["127.0.0.1.example.com:50051", false],
    ["localhost..:50051", false],
    ["dns:///gateway.example.com:443", false],
    ["dns://127.0.0.1/gateway.example.com:443", false], // a local DNS server, a remote gateway
    ["dns://8.8.8.8", false], // no endpoint
    ["passthrough:///gateway.example.com:443", false],
    ["ipv4:127.0.0.1:50051,10.0.0.1:50051", false], // one address leaves the machine
    ["xds:///llmrelay", false],
    ["xds:///localhost:50051", false], // another resolver's scheme: who knows where it resolves
    ["unix:1234", true], // a socket named by digits, not a host and port
    ["localhost:http", true], // a port by its service's name
    ["localhost:", true], // an empty port
    [" 127.0.0.1:50051", false], // not trimmed: a name
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

describe("closedWithoutAWord", () => {
  // grpc-js's words for a TLS connection the gateway closed without an alert, as a gateway with mutual TLS closes a
  // client it does not take (seen against the harness's --mutual-tls gateway, TLS 1.3 and 1.2), and the resets that
  // can come in place of the close; then failures the client can tell itself, which are none. The Go SDK's table
  // (client/go/llmrelay/hints_internal_test.go) has grpc-go's.
  const closed = [
    "No connection established. Last error: Failed to connect (2026-12-04T13:36:29.535Z). Resolution note: ",
    "No connection established. Last error: Error: Client network socket disconnected before secure TLS connection" +
      " was established. Resolution note: ",
    "No connection established. Last error: read ECONNRESET. Resolution note: ",
    "No connection established. Last error: write EPIPE. Resolution note: ",
  ];
  const other = [
    "No connection established. Last error: Error: unable to verify the first certificate. Resolution note: ",
    "No connection established. Last error: Error: 80DCE32C417F0000:error:0A00010B:SSL routines:ssl3_get_record:wrong" +
      " version number:../deps/openssl/openssl/ssl/record/ssl3_record.c:350:\n. Resolution note: ",
    "No connection established. Last error: connect ECONNREFUSED 127.0.0.1:1. Resolution note: ",
  ];
  test("reads the closes as such, and nothing else", () => {
    for (const details of closed) assert.ok(closedWithoutAWord(details), details);
    for (const details of other) assert.ok(!closedWithoutAWord(details), details);
  });
});

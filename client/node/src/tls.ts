/**
 * The transport rule all three SDKs share: plaintext by default only to a loopback target (127.0.0.0/8, ::1,
 * localhost, unix sockets), TLS to anything else; explicit options override it. Pure, no I/O.
 */
import { X509Certificate, createPrivateKey } from "node:crypto";
import { BlockList, isIP } from "node:net";

import { ChannelCredentials } from "@grpc/grpc-js";

/** TLS settings for a gateway with its own CA, or one that asks for a client certificate (mutual TLS). */
export interface TlsOptions {
  /** PEM of the CA(s) that signed the gateway's certificate. Default: the system's roots. */
  rootCerts?: Buffer | string;
  /** PEM of the client's private key, for mutual TLS (with certChain). */
  privateKey?: Buffer | string;
  /** PEM of the client's certificate chain, for mutual TLS (with privateKey). */
  certChain?: Buffer | string;
}

/** How a client reaches the gateway. */
export type Transport = "plaintext" | "tls";

/** The options that choose the transport (a subset of ClientOptions). */
export interface TransportOptions {
  /** true: plaintext; false: TLS even to loopback. Default: plaintext to loopback targets only. */
  insecure?: boolean;
  /** TLS with these roots or client certificate. */
  tls?: TlsOptions;
  /** Credentials built by the caller: they decide, and the rest is ignored. */
  credentials?: ChannelCredentials;
}

const SCHEME = /^([a-z][a-z0-9+.-]*):/i;

/**
 * Whether a gRPC target names only this machine: localhost, or an IP address (as node:net's isIP reads one, strictly:
 * 127.000.000.001 and 127.1 are names) in 127.0.0.0/8, IPv4-mapped too (::ffff:127.0.0.1), or ::1, however spelled;
 * with or without a port, bare or after dns:, dns:///, dns://AUTHORITY/ or passthrough:///, and every address of an
 * ipv4: or ipv6: list; or a unix socket (unix:, unix-abstract:). Anything else, another resolver's scheme included,
 * is not loopback.
 */
export function isLoopbackTarget(target: string): boolean {
  const scheme = SCHEME.exec(target)?.[1]?.toLowerCase();
  if (scheme === "unix" || scheme === "unix-abstract") {
    return true;
  }
  if (scheme === "ipv4" || scheme === "ipv6") {
    const addresses = target.slice(scheme.length + 1).split(",");
    return addresses.every((address) => isLoopbackHost(hostOf(address)));
  }
  if (scheme === "dns" || scheme === "passthrough") {
    // dns:host:port, dns:///host:port, dns://authority/host:port: the authority is the DNS server to ask.
    const rest = target.slice(scheme.length + 1);
    if (!rest.startsWith("//")) {
      return isLoopbackHost(hostOf(rest));
    }
    const slash = rest.indexOf("/", 2);
    return slash >= 0 && isLoopbackHost(hostOf(rest.slice(slash + 1)));
  }
  // No scheme (host:port), or a scheme grpc-js would read as a host name ("localhost:50051" parses as one).
  return isLoopbackHost(hostOf(target));
}

/**
 * What keeps `target` from being a gRPC target, in the Python SDK's words (its target_problem); undefined when nothing
 * does. Never the target itself: a URL may hold a password. The Client refuses such a target when it is made: grpc-js
 * took it, and every call then failed UNAVAILABLE with a hint to switch TLS on or off, which was not the matter.
 */
export function targetProblem(target: string): string | undefined {
  if (/^https?:\/\//i.test(target)) {
    return "a gRPC target is HOST:PORT (or dns:, unix:, ...), not an http:// or https:// URL";
  }
  // No call reaches it (gRPC's core, the Python SDK's, took it modulo 65536: another server got the caller's key).
  if (targetPorts(target).some((port) => Number(port) > 65535)) {
    return "its port is not a number from 0 to 65535";
  }
  return undefined;
}

/**
 * The ports, as written in decimal, of the addresses a HOST:PORT, [V6]:PORT, dns: or ipv4:/ipv6: target names (none
 * for a Unix socket, or an address without one): the Python SDK's _target_ports.
 */
function targetPorts(target: string): string[] {
  const colon = target.indexOf(":");
  const scheme = colon < 0 ? undefined : target.slice(0, colon).toLowerCase();
  const rest = target.slice(colon + 1);
  let addresses: string[];
  if (scheme === "dns") {
    // dns://AUTHORITY/HOST:PORT: the authority's port is the DNS server's, not the gateway's.
    if (rest.startsWith("//")) {
      const slash = rest.indexOf("/", 2);
      addresses = [slash < 0 ? "" : rest.slice(slash + 1)];
    } else {
      addresses = [rest];
    }
  } else if (scheme === "ipv4" || scheme === "ipv6") {
    addresses = rest.split(",");
  } else if (scheme === "unix" || scheme === "unix-abstract") {
    addresses = [];
  } else {
    addresses = [target];
  }
  const ports: string[] = [];
  for (const address of addresses) {
    let port: string;
    if (address.startsWith("[")) {
      const end = address.indexOf("]");
      port = end < 0 ? "" : address.slice(end + 1).replace(/^:/, "");
    } else if (address.split(":").length === 2) {
      port = address.slice(address.indexOf(":") + 1);
    } else {
      continue; // no port, or an IPv6 address bare
    }
    if (/^[0-9]+$/.test(port)) {
      ports.push(port);
    }
  }
  return ports;
}

/** The host of "host", "host:port", "[v6]" or "[v6]:port"; a bare IPv6 address ("::1") stays whole. */
function hostOf(address: string): string {
  if (address.startsWith("[")) {
    const end = address.indexOf("]");
    return end < 0 ? address : address.slice(1, end);
  }
  const colons = address.split(":").length - 1;
  return colons === 1 ? address.slice(0, address.indexOf(":")) : address;
}

/** 127.0.0.0/8 and ::1. A BlockList matches an IPv4-mapped address (::ffff:127.0.0.1) by the IPv4 rules too. */
const LOOPBACK = new BlockList();
LOOPBACK.addSubnet("127.0.0.0", 8, "ipv4");
LOOPBACK.addAddress("::1", "ipv6");

function isLoopbackHost(host: string): boolean {
  if (host.toLowerCase().replace(/\.$/, "") === "localhost") {
    return true;
  }
  const family = isIP(host);
  return family !== 0 && LOOPBACK.check(host, family === 4 ? "ipv4" : "ipv6");
}

/**
 * The transport for a target: what the options say (credentials, insecure, tls), else plaintext to loopback and
 * TLS to anything else. Throws when the options contradict each other.
 */
export function chooseTransport(target: string, options: TransportOptions = {}): Transport {
  if (options.insecure === true && options.tls !== undefined) {
    throw new Error("ClientOptions: insecure: true and tls contradict each other; pass one of them");
  }
  if (options.insecure === true) {
    return "plaintext";
  }
  if (options.insecure === false || options.tls !== undefined) {
    return "tls";
  }
  return isLoopbackTarget(target) ? "plaintext" : "tls";
}

/** The channel credentials for a target (see chooseTransport). */
export function channelCredentials(target: string, options: TransportOptions = {}): ChannelCredentials {
  if (options.credentials) {
    return options.credentials;
  }
  if (chooseTransport(target, options) === "plaintext") {
    return ChannelCredentials.createInsecure();
  }
  const { rootCerts, privateKey, certChain } = options.tls ?? {};
  if ((privateKey === undefined) !== (certChain === undefined)) {
    throw new Error("ClientOptions.tls: mutual TLS needs both privateKey and certChain");
  }
  const [roots, key, chain] = [pem(rootCerts), pem(privateKey), pem(certChain)];
  checkCertificates(roots, key, chain);
  return ChannelCredentials.createSsl(roots, key, chain);
}

function pem(value: Buffer | string | undefined): Buffer | null {
  return value === undefined ? null : Buffer.isBuffer(value) ? value : Buffer.from(value);
}

/**
 * Certificates TLS cannot use, refused when the client is made, as the Python and Go SDKs refuse them: grpc-js took
 * roots that hold no certificate, and every call then failed UNAVAILABLE as if the gateway's certificate were
 * untrusted; a key and certificate swapped, or not a pair, threw OpenSSL's own words, naming no option.
 */
function checkCertificates(rootCerts: Buffer | null, privateKey: Buffer | null, certChain: Buffer | null): void {
  if (rootCerts !== null && !parses(() => new X509Certificate(rootCerts))) {
    throw new Error("ClientOptions.tls.rootCerts: no PEM certificate in it (the CA that signed the gateway's)");
  }
  if (privateKey === null || certChain === null) {
    return;
  }
  let certificate: X509Certificate;
  let key: ReturnType<typeof createPrivateKey>;
  try {
    certificate = new X509Certificate(certChain);
    key = createPrivateKey(privateKey);
  } catch {
    throw new Error(
      "ClientOptions.tls.privateKey and certChain: not a PEM private key and its certificate (are they swapped?)",
    );
  }
  if (!certificate.checkPrivateKey(key)) {
    throw new Error("ClientOptions.tls.privateKey: not the key of the certificate in certChain");
  }
}

function parses(make: () => unknown): boolean {
  try {
    make();
    return true;
  } catch {
    return false;
  }
}

/**
 * grpc-js's last error for a TLS connection its server closed without a word. The gateway (gRPC's core) sends no
 * alert when it refuses a client certificate, none given or one its client CA did not issue: it closes the
 * connection. Under TLS 1.3 (Node's default) the client's handshake is over before the gateway looks at its
 * certificate, so the close comes before the gateway's HTTP/2 settings, and grpc-js says only "Failed to connect
 * (TIME)"; under TLS 1.2 it comes within the handshake, before the client has checked the gateway's certificate
 * either: "Error: Client network socket disconnected before secure TLS connection was established". Neither names
 * the certificate (a plaintext client of a TLS gateway gets the first too), hence the hint only over TLS, and its
 * "if". A failure the client can tell itself keeps its own words and gets no such hint: a server it does not trust
 * ("unable to verify the first certificate"), a plaintext gateway ("wrong version number"), none at all ("connect
 * ECONNREFUSED").
 */
export function closedWithoutAWord(details: string): boolean {
  return CLOSED_WITHOUT_A_WORD.some((words) => details.includes(words));
}

/**
 * How grpc-js's status tells of a connection closed so: under TLS 1.3, then under TLS 1.2; then a reset in place of
 * the close, where it comes first, as the Go SDK reads it and gRPC's core (the Python SDK's) tells it alike.
 */
const CLOSED_WITHOUT_A_WORD = [
  "Last error: Failed to connect (",
  "Last error: Error: Client network socket disconnected before secure TLS connection was established",
  "Last error: read ECONNRESET",
  "Last error: write EPIPE",
];

package llmrelay

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
)

// IsLoopbackTarget says whether a gRPC target names only this machine: "localhost", or a host that is an IP address
// (in the strict form netip.ParseAddr reads: 127.000.000.001 and 127.1 are names, not addresses) in 127.0.0.0/8,
// IPv4-mapped too (::ffff:127.0.0.1), or ::1, however spelled; with or without a port, bare or after dns:, dns:///,
// dns://AUTHORITY/ or passthrough:///, and every address of an ipv4: or ipv6: list; or a Unix socket (unix:,
// unix-abstract:). Dial connects to such a target in plaintext by default, and to any other over TLS with the
// system's roots: traffic that never leaves the machine needs no TLS, traffic that does must not go without it. The
// Python and TypeScript SDKs apply the same rule. Anything this function cannot read (another resolver's scheme, a
// malformed address) is not loopback.
func IsLoopbackTarget(target string) bool {
	scheme, rest, hasScheme := strings.Cut(target, ":")
	if !hasScheme {
		return isLoopbackHost(hostOf(target))
	}
	switch strings.ToLower(scheme) {
	case "unix", "unix-abstract":
		return true
	case "ipv4", "ipv6":
		for _, address := range strings.Split(rest, ",") {
			if !isLoopbackHost(hostOf(address)) {
				return false
			}
		}
		return true
	case "dns", "passthrough":
		if after, ok := strings.CutPrefix(rest, "//"); ok {
			// dns://AUTHORITY/HOST:PORT: the authority is the DNS server to ask, the endpoint what is asked for.
			_, endpoint, ok := strings.Cut(after, "/")
			return ok && isLoopbackHost(hostOf(endpoint))
		}
		return isLoopbackHost(hostOf(rest))
	}
	// No scheme grpc-go resolves: "localhost:50051" and "[::1]:50051" read as a host and a port.
	return isLoopbackHost(hostOf(target))
}

// hostOf is the host of "host", "host:port", "[v6]" or "[v6]:port"; a bare IPv6 address ("::1") stays whole.
func hostOf(address string) string {
	if host, _, err := net.SplitHostPort(address); err == nil {
		return host
	}
	return strings.TrimSuffix(strings.TrimPrefix(address, "["), "]")
}

// isLoopbackHost says whether host is "localhost" (a trailing dot allowed) or a loopback address, IPv4-mapped too.
func isLoopbackHost(host string) bool {
	if strings.EqualFold(strings.TrimSuffix(host, "."), "localhost") {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.Unmap().IsLoopback()
}

// targetProblem says what keeps target from being a gRPC target, in the Python SDK's words (its target_problem); ""
// when nothing does. Never the target itself: a URL may hold a password. Dial refuses such a target: grpc-go took it,
// and every call then failed Unavailable with a hint to switch TLS on or off, which was not the matter.
func targetProblem(target string) string {
	lower := strings.ToLower(target)
	if strings.HasPrefix(lower, "http://") || strings.HasPrefix(lower, "https://") {
		// grpc-go took it as a name to resolve, and every call failed Unavailable with a word of TLS.
		return "a gRPC target is HOST:PORT (or dns:, unix:, ...), not an http:// or https:// URL"
	}
	for _, port := range targetPorts(target) {
		// No call reaches it (gRPC's core, the Python SDK's, took it modulo 65536: another server got the caller's key).
		if n, err := strconv.ParseUint(port, 10, 64); err != nil || n > 65535 {
			return "its port is not a number from 0 to 65535"
		}
	}
	return ""
}

// targetPorts is the ports, as written in decimal, of the addresses a HOST:PORT, [V6]:PORT, dns: or ipv4:/ipv6:
// target names (none for a Unix socket, or an address without one): the Python SDK's _target_ports.
func targetPorts(target string) []string {
	scheme, rest, hasScheme := strings.Cut(target, ":")
	var addresses []string
	switch {
	case hasScheme && strings.EqualFold(scheme, "dns"):
		if after, ok := strings.CutPrefix(rest, "//"); ok {
			// dns://AUTHORITY/HOST:PORT: the authority's port is the DNS server's, not the gateway's.
			_, endpoint, _ := strings.Cut(after, "/")
			addresses = []string{endpoint}
		} else {
			addresses = []string{rest}
		}
	case hasScheme && (strings.EqualFold(scheme, "ipv4") || strings.EqualFold(scheme, "ipv6")):
		addresses = strings.Split(rest, ",")
	case hasScheme && (strings.EqualFold(scheme, "unix") || strings.EqualFold(scheme, "unix-abstract")):
	default:
		addresses = []string{target}
	}
	var ports []string
	for _, address := range addresses {
		var port string
		if strings.HasPrefix(address, "[") {
			_, after, _ := strings.Cut(address, "]")
			port = strings.TrimPrefix(after, ":")
		} else if strings.Count(address, ":") == 1 {
			_, port, _ = strings.Cut(address, ":")
		} else {
			continue // no port, or an IPv6 address bare
		}
		if port != "" && strings.Trim(port, "0123456789") == "" {
			ports = append(ports, port)
		}
	}
	return ports
}

// TLSConfig is a TLS configuration for WithTLS from PEM files: caFile, the roots that verify the gateway's
// certificate ("" for the system's), and certFile with keyFile, this client's certificate for a gateway that asks
// for one (both "" for none).
func TLSConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	config := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("llmrelay: the CA file: %w", err)
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("llmrelay: the CA file %s holds no PEM certificate", caFile)
		}
		config.RootCAs = roots
	}
	if (certFile == "") != (keyFile == "") {
		return nil, fmt.Errorf("llmrelay: a client certificate needs both files, got certificate %q and key %q",
			certFile, keyFile)
	}
	if certFile != "" {
		certificate, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("llmrelay: the client certificate: %w", err)
		}
		config.Certificates = []tls.Certificate{certificate}
	}
	return config, nil
}

package llmrelay

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
)

// IsLoopbackTarget says whether a gRPC target names only this machine: a host in 127.0.0.0/8, ::1 or "localhost"
// (with or without a port, bare or after dns:, dns:///, dns://AUTHORITY/ or passthrough:///), or a Unix socket
// (unix:, unix-abstract:). Dial connects to such a target in plaintext by default, and to any other over TLS with
// the system's roots: traffic that never leaves the machine needs no TLS, traffic that does must not go without it.
// Anything this function cannot read (another resolver's scheme, a malformed address) is not loopback.
func IsLoopbackTarget(target string) bool {
	endpoint := target
	if scheme, rest, ok := strings.Cut(target, ":"); ok {
		switch strings.ToLower(scheme) {
		case "unix", "unix-abstract":
			return true
		case "dns", "passthrough":
			endpoint = rest
			if after, ok := strings.CutPrefix(rest, "//"); ok {
				// dns://AUTHORITY/HOST:PORT: the authority is the DNS server to ask, the endpoint what is asked for.
				_, endpoint, ok = strings.Cut(after, "/")
				if !ok {
					return false
				}
			}
		}
	}
	host := endpoint
	if h, _, err := net.SplitHostPort(endpoint); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.Unmap().IsLoopback()
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

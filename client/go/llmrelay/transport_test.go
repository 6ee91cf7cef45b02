package llmrelay_test

// Unit tests of the transport security rule (which targets get plaintext by default) and of TLSConfig: no server.

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/llmrelay/llmrelay/client/go/llmrelay"
)

func TestIsLoopbackTarget(t *testing.T) {
	cases := []struct {
		target   string
		loopback bool
	}{
		{"127.0.0.1:50051", true},
		{"127.0.0.1", true},
		{"127.45.6.7:443", true}, // all of 127.0.0.0/8
		{"localhost:50051", true},
		{"LocalHost:50051", true},
		{"localhost", true},
		{"[::1]:50051", true},
		{"::1", true},
		{"[::ffff:127.0.0.1]:50051", true},
		{"dns:///localhost:50051", true},
		{"dns:///127.0.0.1:50051", true},
		{"dns:localhost:50051", true},
		{"dns://8.8.8.8/localhost:50051", true}, // the authority is the DNS server, not the gateway
		{"DNS:///[::1]:50051", true},
		{"passthrough:///127.0.0.1:50051", true},
		{"unix:/tmp/llmrelay.sock", true},
		{"unix:///tmp/llmrelay.sock", true},
		{"unix-abstract:llmrelay", true},
		{"localhost.:50051", true},
		{"ipv4:127.0.0.1:50051,127.0.0.2:50052", true},
		{"ipv6:[::1]:50051", true},
		{"ipv4:127.0.0.1:50051,10.0.0.1:50051", false}, // one address leaves the machine
		{"gateway.example.com:443", false},
		{"dns:///gateway.example.com:443", false},
		{"dns://127.0.0.1/gateway.example.com:443", false}, // a local DNS server, a remote gateway
		{"10.0.0.5:50051", false},
		{"0.0.0.0:50051", false},
		{"[::]:50051", false},
		{"[2001:db8::1]:50051", false},
		{"localhost.example.com:50051", false},
		{"128.0.0.1:50051", false},
		{"xds:///llmrelay", false},
		{"dns://8.8.8.8", false}, // no endpoint
		{"", false},
	}
	for _, c := range cases {
		if got := llmrelay.IsLoopbackTarget(c.target); got != c.loopback {
			t.Errorf("IsLoopbackTarget(%q) = %t, want %t", c.target, got, c.loopback)
		}
	}
}

func TestTLSConfigSaysWhatIsWrong(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, caFile, certFile, keyFile, want string
	}{
		{"missing CA", filepath.Join(dir, "missing.pem"), "", "", "the CA file"},
		{"CA without PEM", notPEM, "", "", "holds no PEM certificate"},
		{"certificate without key", "", notPEM, "", "needs both files"},
		{"unreadable pair", "", notPEM, notPEM, "the client certificate"},
	}
	for _, c := range cases {
		_, err := llmrelay.TLSConfig(c.caFile, c.certFile, c.keyFile)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one that says %q", c.name, err, c.want)
		}
	}
	config, err := llmrelay.TLSConfig("", "", "")
	if err != nil || config.RootCAs != nil || len(config.Certificates) != 0 || config.MinVersion != tls.VersionTLS12 {
		t.Errorf("no files: %+v, %v; want the system's roots, no client certificate", config, err)
	}
}

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

// loopbackTargets is the transport rule's table, the same rows as the Python SDK's (tests/unit/sdk/test_channel.py)
// and the TypeScript SDK's (client/node/test/tls.test.ts): change the three together. A host is loopback when the
// language's strict parser reads it as an address in 127.0.0.0/8, ::1 or ::ffff:127.0.0.0/104 (any spelling), or when
// it is "localhost"; anything the parser refuses (leading zeros, 127.1, hex) is a name, and gets TLS.
var loopbackTargets = []struct {
	target   string
	loopback bool
}{
	{"127.0.0.1:50051", true},
	{"127.0.0.1", true},
	{"127.45.6.7:443", true}, // all of 127.0.0.0/8
	{"127.255.255.255:1", true},
	{"localhost:50051", true},
	{"LocalHost:50051", true},
	{"localhost", true},
	{"localhost.:50051", true},
	{"[::1]:50051", true},
	{"::1", true},
	{"[0::1]:50051", true},
	{"[0:0:0:0:0:0:0:1]:50051", true},
	{"[::0001]:50051", true},
	{"[::1%lo]:50051", true},
	{"[::ffff:127.0.0.1]:50051", true}, // IPv4-mapped 127.0.0.1, in every spelling
	{"[::ffff:7f00:1]:50051", true},
	{"[::FFFF:127.1.2.3]:50051", true},
	{"[0:0:0:0:0:ffff:7f00:1]:50051", true},
	{"::ffff:127.0.0.1", true},
	{"dns:///localhost:50051", true},
	{"dns:///127.0.0.1:50051", true},
	{"dns:localhost:50051", true},
	{"dns://8.8.8.8/localhost:50051", true}, // the authority is the DNS server, not the gateway
	{"DNS:///[::1]:50051", true},
	{"dns:///[::ffff:127.0.0.1]:50051", true},
	{"passthrough:///127.0.0.1:50051", true},
	{"passthrough:///localhost:50051", true},
	{"ipv4:127.0.0.1:50051,127.0.0.2:50052", true},
	{"ipv6:[::1]:50051", true},
	{"ipv6:[::ffff:7f00:1]:50051", true},
	{"unix:/run/llmrelay.sock", true},
	{"unix:///run/llmrelay.sock", true},
	{"unix-abstract:llmrelay", true},
	{"127.000.000.001:50051", false}, // leading zeros: not an address to the strict parsers, so a name
	{"127.1:50051", false},
	{"0x7f.0.0.1:50051", false},
	{"0177.0.0.1:50051", false},
	{"127.0.0.256:50051", false},
	{"[::ffff:128.0.0.1]:50051", false},
	{"[::127.0.0.1]:50051", false},        // IPv4-compatible, not IPv4-mapped
	{"[::ffff:0:127.0.0.1]:50051", false}, // IPv4-translated, not IPv4-mapped
	{"[::2]:50051", false},
	{"[::]:50051", false},
	{"[fe80::1%eth0]:50051", false},
	{"0.0.0.0:50051", false},
	{"10.0.0.5:50051", false},
	{"128.0.0.1:50051", false},
	{"[2001:db8::1]:50051", false},
	{"gateway.example.com:443", false},
	{"gateway.example.com", false},
	{"localhost.example.com:50051", false},
	{"127.0.0.1.example.com:50051", false},
	{"localhost..:50051", false},
	{"dns:///gateway.example.com:443", false},
	{"dns://127.0.0.1/gateway.example.com:443", false}, // a local DNS server, a remote gateway
	{"dns://8.8.8.8", false},                           // no endpoint
	{"passthrough:///gateway.example.com:443", false},
	{"ipv4:127.0.0.1:50051,10.0.0.1:50051", false}, // one address leaves the machine
	{"xds:///llmrelay", false},
	{"xds:///localhost:50051", false}, // another resolver's scheme: who knows where it resolves
	{"unix:1234", true},               // a socket named by digits, not a host and port
	{"localhost:http", true},          // a port by its service's name
	{"localhost:", true},              // an empty port
	{" 127.0.0.1:50051", false},       // not trimmed: a name
	{"", false},
}

func TestIsLoopbackTarget(t *testing.T) {
	for _, c := range loopbackTargets {
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

package llmrelay_test

// Unit tests of what Dial refuses as a target, as the Python SDK refuses it (tests/unit/sdk/test_channel.py) and the
// TypeScript SDK (client/node/test/target.test.ts), and of how fmt prints a client: no value of its headers. No server.

import (
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/llmrelay/llmrelay/client/go/llmrelay"
)

// A URL was taken, and every call failed Unavailable with a hint to switch TLS on or off, which did not help.
func TestDialRefusesAURLForATargetWithoutShowingIt(t *testing.T) {
	for _, target := range []string{
		"https://host:1", "http://x", "http://127.0.0.1:1", "HTTPS://user:secret@llm.example.com",
	} {
		client, err := llmrelay.Dial(target)
		if err == nil {
			client.Close()
			t.Errorf("Dial(%q) made a client; want an error", target)
			continue
		}
		const want = "llmrelay: target: a gRPC target is HOST:PORT (or dns:, unix:, ...), not an http:// or https:// URL"
		if err.Error() != want {
			t.Errorf("Dial(%q): %q; want %q", target, err, want)
		}
	}
}

// A port past 65535 reaches no gateway (gRPC's core, the Python SDK's, took it modulo 65536: another server's port).
func TestDialRefusesAPortPast65535(t *testing.T) {
	for _, target := range []string{
		"127.0.0.1:92805", "[::1]:70000", "dns:///gw.example:65536", "dns://8.8.8.8/gw.example:99999",
		"ipv4:127.0.0.1:1,127.0.0.1:70000", "127.0.0.1:99999999999999999999999",
	} {
		client, err := llmrelay.Dial(target, llmrelay.WithInsecure())
		if err == nil {
			client.Close()
			t.Errorf("Dial(%q) made a client; want an error", target)
			continue
		}
		if want := "llmrelay: target: its port is not a number from 0 to 65535"; err.Error() != want {
			t.Errorf("Dial(%q): %q; want %q", target, err, want)
		}
	}
}

func TestDialTakesATargetWhosePortsAreInRangeOrHasNone(t *testing.T) {
	for _, target := range []string{
		"127.0.0.1:65535", "[::1]:1", "dns:///gw.example:443", "dns://8.8.8.8:53/gw.example:443",
		"unix:/run/llmrelay:70000", "::1", "gw", "localhost:http",
	} {
		client, err := llmrelay.Dial(target, llmrelay.WithInsecure())
		if err != nil {
			t.Errorf("Dial(%q): %v; want a client", target, err)
			continue
		}
		client.Close()
	}
}

// fmt printed the struct, the caller's key to the gateway among its headers, in clear.
func TestFmtShowsNoValueOfTheClientsHeaders(t *testing.T) {
	const secret = "sk-SECRET-123"
	client, err := llmrelay.Dial("127.0.0.1:1", llmrelay.WithHeader("Authorization", "Bearer "+secret),
		llmrelay.WithCaller("ci-"+secret))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	agent := &llmrelay.Agent{Client: client}
	// In an unexported field, a *Client is printed without its Format method: its headers are behind a pointer.
	holder := struct{ client *llmrelay.Client }{client}
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x"} {
		for _, arg := range []any{
			client, agent, *agent, []*llmrelay.Client{client}, map[string]*llmrelay.Client{"c": client}, holder, &holder,
		} {
			if text := fmt.Sprintf(verb, arg); strings.Contains(text, secret) || strings.Contains(text, "736b2d534543524554") {
				t.Errorf("%s of a %T: %s; want no value of a header", verb, arg, text)
			}
		}
	}
	if text := fmt.Sprint(client); !strings.Contains(text, `"127.0.0.1:1"`) ||
		!strings.Contains(text, `["authorization" "x-llmrelay-caller"] (values not shown)`) {
		t.Errorf("fmt.Sprint(client) = %s; want the target and the keys of the headers", text)
	}
	// A copy of the Client itself, which has no Format method (reflect's, as go vet refuses a copy of its atomic).
	for _, verb := range []string{"%v", "%+v", "%#v"} {
		if text := fmt.Sprintf(verb, reflect.ValueOf(client).Elem()); strings.Contains(text, secret) {
			t.Errorf("%s of a Client: %s; want no value of a header", verb, text)
		}
	}
	var none *llmrelay.Client
	if text := fmt.Sprintf("%v %#v", none, none); text != "<nil> (*llmrelay.Client)(nil)" {
		t.Errorf("a nil *Client prints %q", text)
	}
}

package llmrelay

// Unit tests of the hints that complete the message of a call that could not reach the gateway: which one a client
// gives, for which of grpc-go's messages. No server: the end-to-end tests see grpc-go say them.

import (
	"context"
	"crypto/tls"
	"strings"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// What grpc-go says of a TLS connection the gateway closed without a word, as seen in the end-to-end tests against a
// gateway with mutual TLS (TLS 1.3, and 1.2 with MaxVersion), and the resets that can come in place of the close.
var closedMessages = []string{
	`connection error: desc = "error reading server preface: EOF"`,
	"write tcp 127.0.0.1:42038->127.0.0.1:35971: write: broken pipe",
	`connection error: desc = "transport: authentication handshake failed: EOF"`,
	`connection error: desc = "error reading server preface: read tcp 127.0.0.1:1->127.0.0.1:2: read: connection reset by peer"`,
	`connection error: desc = "transport: failed to write client preface: write tcp 127.0.0.1:1->127.0.0.1:2: write: connection reset by peer"`,
}

// What grpc-go says of failures the client can tell itself: none of them is a closed connection.
var otherMessages = []string{
	`connection error: desc = "transport: authentication handshake failed: tls: failed to verify certificate: x509: certificate signed by unknown authority"`,
	`connection error: desc = "transport: authentication handshake failed: tls: first record does not look like a TLS handshake"`,
	`connection error: desc = "transport: Error while dialing: dial tcp 127.0.0.1:1: connect: connection refused"`,
	`connection error: desc = "error reading from server: EOF"`,
}

func TestClosedWithoutAWord(t *testing.T) {
	for _, message := range closedMessages {
		if !closedWithoutAWord(message) {
			t.Errorf("%q: not read as a connection closed without a word", message)
		}
	}
	for _, message := range otherMessages {
		if closedWithoutAWord(message) {
			t.Errorf("%q: read as a connection closed without a word", message)
		}
	}
}

func TestWhichHint(t *testing.T) {
	const (
		none      = "this client gave none"
		notTaken  = "it did not take this client's"
		ruleTLS   = "its default for a target that is not loopback"
		plaintext = "its default for a loopback target"
	)
	certificate := tls.Certificate{Certificate: [][]byte{{1}}}
	withCertificate := &tls.Config{Certificates: []tls.Certificate{certificate}}
	getter := &tls.Config{GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		return &certificate, nil
	}}
	cases := []struct {
		name   string
		target string
		opts   []Option
		closed string // the hint for a connection closed without a word; "": none
		other  string // for another failure; "": none
	}{
		// The rule's TLS: the certificate's hint in place of the rule's, the more specific.
		{"the rule's TLS", "gateway.example:443", nil, none, ruleTLS},
		{"the rule's plaintext", "127.0.0.1:50051", nil, plaintext, plaintext},
		{"WithTLS(nil)", "127.0.0.1:50051", []Option{WithTLS(nil)}, none, ""},
		{"WithTLS without a certificate", "gateway.example:443", []Option{WithTLS(&tls.Config{})}, none, ""},
		{"WithTLS with a certificate", "gateway.example:443", []Option{WithTLS(withCertificate)}, notTaken, ""},
		{"WithTLS with GetClientCertificate", "gateway.example:443", []Option{WithTLS(getter)}, notTaken, ""},
		{"WithInsecure", "gateway.example:443", []Option{WithInsecure()}, "", ""},
		// What the caller's own credentials present is not known.
		{"WithTransportCredentials", "gateway.example:443",
			[]Option{WithTransportCredentials(credentials.NewTLS(nil))}, "", ""},
		{"WithTLS then WithTransportCredentials", "gateway.example:443",
			[]Option{WithTLS(nil), WithTransportCredentials(credentials.NewTLS(nil))}, "", ""},
		{"the last option wins", "gateway.example:443", []Option{WithInsecure(), WithTLS(withCertificate)}, notTaken, ""},
	}
	for _, c := range cases {
		client, err := Dial(c.target, c.opts...)
		if err != nil {
			t.Fatal(err)
		}
		for _, failure := range []struct {
			message, want string
		}{{closedMessages[0], c.closed}, {otherMessages[0], c.other}} {
			e := client.wrapError(context.Background(), status.Error(codes.Unavailable, failure.message), nil, false)
			message := e.(*Error).Message
			hint := strings.TrimPrefix(message, failure.message)
			if failure.want == "" && hint != "" || failure.want != "" && !strings.Contains(hint, failure.want) {
				t.Errorf("%s, %q: hint %q; want %q", c.name, failure.message, hint, failure.want)
			}
			for _, other := range []string{none, notTaken, ruleTLS, plaintext} {
				if other != failure.want && strings.Contains(hint, other) {
					t.Errorf("%s, %q: hint %q; want %q alone", c.name, failure.message, hint, failure.want)
				}
			}
		}
		// Reached: the gateway answered, so neither its transport security nor its certificates were wrong; nor are
		// they for the calls after it (a gateway gone, or restarting, refuses their connections).
		for _, message := range []string{closedMessages[0], otherMessages[0]} {
			e := client.wrapError(context.Background(), status.Error(codes.Unavailable, message), nil, true)
			if got := e.(*Error).Message; got != message {
				t.Errorf("%s: a call that reached the gateway says %q", c.name, got)
			}
			e = client.wrapError(context.Background(), status.Error(codes.Unavailable, message), nil, false)
			if got := e.(*Error).Message; got != message {
				t.Errorf("%s: a call after one that reached the gateway says %q", c.name, got)
			}
		}
		_ = client.Close()
	}
}

// An error status that came from the gateway, trailers-only with no response headers (reached false), tells that it
// was reached: its ErrorInfo's domain is the gateway's, or its trailer carries the call's x-request-id. One from
// elsewhere (a proxy's, grpc-go's own) does not.
func TestAnErrorFromTheGatewayCountsAsReached(t *testing.T) {
	const hint = "its default for a loopback target"
	unavailable := status.Error(codes.Unavailable, otherMessages[2])
	refusedStatus, err := status.New(codes.InvalidArgument, "messages: at least one message is required").WithDetails(
		&errdetails.ErrorInfo{Reason: "INVALID_REQUEST", Domain: Domain})
	if err != nil {
		t.Fatal(err)
	}
	proxyStatus, err := status.New(codes.PermissionDenied, "denied").WithDetails(
		&errdetails.ErrorInfo{Reason: "DENIED", Domain: "proxy.example"})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		err     error
		trailer metadata.MD
		reached bool
	}{
		{"the gateway's ErrorInfo", refusedStatus.Err(), nil, true},
		{"the gateway's x-request-id", status.Error(codes.Unauthenticated, "no key"),
			metadata.Pairs(requestIDTrailer, "0123abcd"), true},
		{"another domain's ErrorInfo", proxyStatus.Err(), nil, false},
		{"a bare status", status.Error(codes.Unauthenticated, "no key"), nil, false},
	}
	for _, c := range cases {
		client, err := Dial("127.0.0.1:1")
		if err != nil {
			t.Fatal(err)
		}
		_ = client.wrapError(context.Background(), c.err, c.trailer, false)
		message := client.wrapError(context.Background(), unavailable, nil, false).(*Error).Message
		if strings.Contains(message, hint) == c.reached {
			t.Errorf("after %s: the next UNAVAILABLE says %q; want the hint: %t", c.name, message, !c.reached)
		}
		_ = client.Close()
	}
}

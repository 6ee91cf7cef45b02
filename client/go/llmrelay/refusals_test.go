package llmrelay_test

// What the client refuses before a call goes out, as an InvalidArgument *Error of its own: what grpc-go would fail
// Internal, as though the gateway had, with words that named no field or no key (text that is not UTF-8, metadata
// gRPC cannot send), and the options Dial cannot honour.

import (
	"context"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/llmrelay/llmrelay/client/go/llmrelay"
	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

// latin1 is "café crème" as a Latin-1 file holds it (os.ReadFile's bytes): é is 0xe9, not UTF-8.
const latin1 = "caf\xe9 cr\xe8me"

// streamError is the error of a stream: Stream's own, or the first Recv's that is not io.EOF.
func streamError(t *testing.T, client *llmrelay.Client, req *llmrelayv1.StreamCompleteRequest) error {
	t.Helper()
	stream, err := client.Stream(testContext(t), req)
	if err != nil {
		return err
	}
	defer stream.Close()
	_, err = collect(t, stream)
	return err
}

// mustRefuseText asserts that err is INVALID_REQUEST with one field violation, on field, that shows none of the text.
func mustRefuseText(t *testing.T, err error, field string) {
	t.Helper()
	e := mustFail(t, err, codes.InvalidArgument)
	violations := e.FieldViolations()
	if e.Reason() != "INVALID_REQUEST" || len(violations) != 1 || violations[0].GetField() != field {
		t.Errorf("reason %q, field violations %v; want INVALID_REQUEST on %s", e.Reason(), violations, field)
	}
	if strings.Contains(err.Error(), "caf") || !strings.Contains(err.Error(), "not valid UTF-8 text") ||
		!strings.Contains(err.Error(), "0xe9") {
		t.Errorf("error %q; want it to say which byte is not UTF-8, and to show none of the text", err)
	}
}

func TestTextThatIsNotUTF8IsInvalidArgumentNamingTheField(t *testing.T) {
	client := setup(t)
	ctx := testContext(t)
	text := latin1
	_, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat(latin1)})
	mustRefuseText(t, err, "messages[1].content")
	mustRefuseText(t, streamError(t, client, &llmrelayv1.StreamCompleteRequest{Messages: chat(latin1)}),
		"messages[1].content")
	_, err = client.Embed(ctx, &llmrelayv1.EmbedRequest{Inputs: []string{"café", latin1}})
	mustRefuseText(t, err, "inputs[1]")
	_, err = client.CountTokens(ctx, &llmrelayv1.CountTokensRequest{Text: &text})
	mustRefuseText(t, err, "text")

	// Nested messages, a oneof, a repeated field, and a map (a Struct's fields).
	call := &llmrelayv1.Message{Role: llmrelayv1.Role_ROLE_ASSISTANT, ToolCalls: []*llmrelayv1.ToolCall{
		{Id: "call_1", Function: &llmrelayv1.FunctionCall{Name: "read_file", Arguments: `{"path": "` + latin1 + `"}`}},
	}}
	_, err = client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: append(chat("hi"), call)})
	mustRefuseText(t, err, "messages[2].tool_calls[0].function.arguments")
	parts := &llmrelayv1.Message{Role: llmrelayv1.Role_ROLE_USER, Parts: []*llmrelayv1.ContentPart{
		{Part: &llmrelayv1.ContentPart_Text{Text: "look"}}, {Part: &llmrelayv1.ContentPart_Text{Text: latin1}},
	}}
	_, err = client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: []*llmrelayv1.Message{parts}})
	mustRefuseText(t, err, "messages[0].parts[1].text")
	options := &llmrelayv1.CompletionOptions{Stop: []string{"\n", latin1}}
	_, err = client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("hi"), Options: options})
	mustRefuseText(t, err, "options.stop[1]")
	parameters := &structpb.Struct{Fields: map[string]*structpb.Value{ // structpb.NewStruct refuses the text itself
		"type": structpb.NewStringValue("object"), "description": structpb.NewStringValue(latin1),
	}}
	tools := []*llmrelayv1.Tool{{Function: &llmrelayv1.FunctionDefinition{Name: "f", Parameters: parameters}}}
	_, err = client.CountTokens(ctx, &llmrelayv1.CountTokensRequest{Messages: chat("hi"), Tools: tools})
	mustRefuseText(t, err, `tools[0].function.parameters.fields["description"].string_value`)

	// UTF-8 beyond ASCII is text like any other.
	resp, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("café ☕")})
	if err != nil || resp.GetMessage().GetContent() != "echo: café ☕" {
		t.Errorf("Complete(café ☕): %v, %q", err, resp.GetMessage().GetContent())
	}
}

func TestACallsOwnHeaderGRPCCannotSendIsInvalidArgumentNamingTheKey(t *testing.T) {
	client := setup(t, llmrelay.WithHeader("authorization", "Bearer good"))
	// A key read from a file with its newline replacing the client's: the call failed Internal, "header key
	// "authorization" contains value with non-printable ASCII characters", as though the gateway had.
	for _, value := range []string{"Bearer sk-live-SECRET\n", "Bearer sk-live-SÉCRET"} {
		ctx := metadata.AppendToOutgoingContext(testContext(t), "authorization", value)
		_, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("hi")})
		e := mustFail(t, err, codes.InvalidArgument)
		if !strings.Contains(e.Message, `"authorization"`) || !strings.Contains(e.Message, "value not shown") ||
			strings.Contains(err.Error(), "SECRET") || strings.Contains(err.Error(), "SÉCRET") {
			t.Errorf("error %q; want it to name the key and not show the value", err)
		}
		stream, err := client.Stream(ctx, &llmrelayv1.StreamCompleteRequest{Messages: chat("hi")})
		if err == nil {
			stream.Close()
		}
		mustFail(t, err, codes.InvalidArgument)
	}
	ctx := metadata.NewOutgoingContext(testContext(t), metadata.MD{"bad key": {"v"}})
	_, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("hi")})
	if e := mustFail(t, err, codes.InvalidArgument); !strings.Contains(e.Message, `"bad key"`) {
		t.Errorf("error %q; want it to name the key", err)
	}
	// Bytes under a key ending -bin, and a key of gRPC's own (a trace's context), go as they are.
	ctx = metadata.AppendToOutgoingContext(testContext(t), "x-trace-bin", "\x00\xff\n", "grpc-trace-bin", "\x00")
	if _, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("hi")}); err != nil {
		t.Errorf("a call with binary metadata: %v", err)
	}
}

// metadataRecorder is a gRPC server on loopback whose Complete records the metadata it received: what the client
// sent, without a gateway.
type metadataRecorder struct {
	llmrelayv1.UnimplementedLLMServiceServer
	mu       sync.Mutex
	received metadata.MD
}

func (r *metadataRecorder) Complete(ctx context.Context, _ *llmrelayv1.CompleteRequest) (*llmrelayv1.CompleteResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.received, _ = metadata.FromIncomingContext(ctx)
	return &llmrelayv1.CompleteResponse{}, nil
}

// startMetadataRecorder serves a metadataRecorder on loopback until the test ends, and returns it with its target.
func startMetadataRecorder(t *testing.T) (*metadataRecorder, string) {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	recorder := &metadataRecorder{}
	llmrelayv1.RegisterLLMServiceServer(server, recorder)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	return recorder, listener.Addr().String()
}

func TestALaterHeaderOfTheSameKeyReplacesTheEarlierInAnyCase(t *testing.T) {
	recorder, target := startMetadataRecorder(t)
	// Both were sent: the gateway took the first, other servers and proxies may take the last.
	client := dial(t, target,
		llmrelay.WithHeader("authorization", "Bearer shared-default"), llmrelay.WithHeader("Authorization", "Bearer mine"),
		llmrelay.WithCaller("batch"), llmrelay.WithHeader("X-LLMRelay-Caller", "nightly-batch"))
	if _, err := client.Complete(testContext(t), &llmrelayv1.CompleteRequest{Messages: chat("hi")}); err != nil {
		t.Fatalf("Complete: %v", err)
	}
	got := recorder.received
	if !slices.Equal(got.Get("authorization"), []string{"Bearer mine"}) ||
		!slices.Equal(got.Get(llmrelay.CallerHeader), []string{"nightly-batch"}) {
		t.Errorf("authorization %q, caller %q; want the later options' values alone",
			got.Get("authorization"), got.Get(llmrelay.CallerHeader))
	}
}

func TestACallsLiteralMetadataWithAnUpperCaseKeyIsSentLowerCased(t *testing.T) {
	recorder, target := startMetadataRecorder(t)
	client := dial(t, target, llmrelay.WithHeader("x-team", "search"))
	// metadata.MD is a plain map: grpc-go checked the key as written and failed the call Internal, "header key
	// "X-Trace" contains illegal characters", as though the gateway had.
	ctx := metadata.NewOutgoingContext(testContext(t), metadata.MD{"X-Trace": {"abc"}, "X-Team": {"ranking"}})
	ctx = metadata.AppendToOutgoingContext(ctx, "x-span", "s1")
	if _, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("hi")}); err != nil {
		t.Fatalf("Complete with metadata.MD{\"X-Trace\": ...}: %v", err)
	}
	got := recorder.received
	if !slices.Equal(got.Get("x-trace"), []string{"abc"}) || !slices.Equal(got.Get("x-team"), []string{"ranking"}) ||
		!slices.Equal(got.Get("x-span"), []string{"s1"}) {
		t.Errorf("received %v; want x-trace abc, the call's x-team ranking in place of the client's, and x-span s1", got)
	}
}

func TestDialRefusesAHeaderKeyOfGRPCsOwnInAnyCase(t *testing.T) {
	for _, key := range []string{"grpc-timeout", "GRPC-Timeout", "Grpc-Encoding"} {
		_, err := llmrelay.Dial("127.0.0.1:1", llmrelay.WithHeader(key, "1S"))
		// The message blamed the key's characters, which gRPC takes; in upper case, Dial took the key.
		if err == nil || !strings.Contains(err.Error(), "keys starting grpc- are gRPC's own") {
			t.Errorf("Dial(WithHeader(%q)): %v; want it refused as a key of gRPC's own", key, err)
		}
	}
}

func TestDialRefusesANegativeTimeout(t *testing.T) {
	// Taken, it meant no deadline at all, as 0 does.
	_, err := llmrelay.Dial("127.0.0.1:1", llmrelay.WithTimeout(-time.Second))
	if err == nil || !strings.Contains(err.Error(), "WithTimeout") {
		t.Errorf("Dial(WithTimeout(-1s)): %v; want an error naming WithTimeout", err)
	}
	client, err := llmrelay.Dial("127.0.0.1:1", llmrelay.WithTimeout(0))
	if err != nil {
		t.Fatalf("Dial(WithTimeout(0)): %v", err)
	}
	client.Close()
}

// The keys gRPC does not send as given: HTTP/1's connection-specific ones, which a conforming HTTP/2 hop (Go's
// net/http, Envoy) refused, failing every call Internal (a grpc-go server reset the stream), and those grpc-go drops
// for its own without a word, with what each refusal says of them.
var unsendableKeys = []struct{ key, says string }{
	{"connection", "cannot send a connection-specific header"},
	{"keep-alive", "cannot send a connection-specific header"},
	{"proxy-connection", "cannot send a connection-specific header"},
	{"transfer-encoding", "cannot send a connection-specific header"},
	{"upgrade", "cannot send a connection-specific header"},
	{"http2-settings", "cannot send a connection-specific header"},
	{"te", "are gRPC's own"},
	{"content-type", "are gRPC's own"},
	{"user-agent", "grpc.WithUserAgent"},
}

func TestDialRefusesAHeaderKeyGRPCDoesNotSendAsGiven(t *testing.T) {
	for _, c := range unsendableKeys {
		for _, key := range []string{c.key, strings.ToUpper(c.key)} {
			_, err := llmrelay.Dial("127.0.0.1:1", llmrelay.WithHeader(key, "v"))
			if err == nil || !strings.Contains(err.Error(), `"`+c.key+`"`) || !strings.Contains(err.Error(), c.says) {
				t.Errorf("Dial(WithHeader(%q)): %v; want it refused, naming the key and saying %q", key, err, c.says)
			}
		}
	}
}

func TestACallsOwnKeyGRPCDoesNotSendAsGivenIsInvalidArgumentNamingTheKey(t *testing.T) {
	recorder, target := startMetadataRecorder(t)
	client := dial(t, target)
	for _, c := range unsendableKeys {
		for _, ctx := range []context.Context{
			metadata.AppendToOutgoingContext(testContext(t), c.key, "v"),
			metadata.NewOutgoingContext(testContext(t), metadata.MD{strings.ToUpper(c.key): {"v"}}),
		} {
			_, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("hi")})
			if e := mustFail(t, err, codes.InvalidArgument); !strings.Contains(e.Message, `"`+c.key+`"`) ||
				!strings.Contains(e.Message, c.says) {
				t.Errorf("a call with metadata %q: %v; want it to name the key and say %q", c.key, err, c.says)
			}
			stream, err := client.Stream(ctx, &llmrelayv1.StreamCompleteRequest{Messages: chat("hi")})
			if err == nil {
				stream.Close()
			}
			if e := mustFail(t, err, codes.InvalidArgument); !strings.Contains(e.Message, `"`+c.key+`"`) {
				t.Errorf("a stream with metadata %q: %v; want it to name the key", c.key, err)
			}
		}
	}
	recorder.mu.Lock()
	defer recorder.mu.Unlock()
	if recorder.received != nil {
		t.Errorf("the server received a call, with metadata %v; want none sent", recorder.received)
	}
}

package llmrelay_test

// End-to-end tests: the real gateway (.venv/bin/llmrelay-server) in front of the fake OpenAI upstream
// (tests/upstream.py), both subprocesses on loopback, called through this package.

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/llmrelay/llmrelay/client/go/internal/gatewaytest"
	"github.com/llmrelay/llmrelay/client/go/llmrelay"
	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

var env *gatewaytest.Gateway // the harness's plain gateway; nil outside the repo: the end-to-end tests skip

// harness is a gateway of the harness with other options, started by the first test that needs it.
type harness struct {
	opts    gatewaytest.Options
	once    sync.Once
	gateway *gatewaytest.Gateway
	err     error
}

var (
	// fallbackGateway has two backends, "ollama" then FallbackBackend, both at its upstream: a fault queued there is
	// taken by the first backend's request, and the next backend's is clean.
	fallbackGateway = &harness{opts: gatewaytest.Options{Fallback: true}}
	// tlsGateway serves TLS with a certificate from its CAFile.
	tlsGateway = &harness{opts: gatewaytest.Options{TLS: true}}
	// mutualTLSGateway serves TLS so, and takes only its ClientCertFile's certificate from a client.
	mutualTLSGateway = &harness{opts: gatewaytest.Options{MutualTLS: true}}
)

// start starts the harness once, clears its upstream's faults, and returns it.
func (h *harness) start(t *testing.T) *gatewaytest.Gateway {
	t.Helper()
	needGateway(t)
	h.once.Do(func() { h.gateway, h.err = gatewaytest.Start(h.opts) })
	if h.err != nil {
		t.Fatal(h.err)
	}
	if err := h.gateway.Upstream.ClearFaults(); err != nil {
		t.Fatal(err)
	}
	return h.gateway
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) (code int) {
	var err error
	env, err = gatewaytest.Start(gatewaytest.Options{})
	if errors.Is(err, gatewaytest.ErrNoRepo) {
		fmt.Println("skipping the end-to-end tests:", err)
		env = nil
		return m.Run()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() {
		// A harness that does not exit 0 lost its gateway during the tests: say so, with the gateway's log.
		for _, gateway := range []*gatewaytest.Gateway{env, fallbackGateway.gateway, tlsGateway.gateway,
			mutualTLSGateway.gateway} {
			if gateway == nil {
				continue
			}
			if err := gateway.Close(); err != nil {
				fmt.Fprintln(os.Stderr, err)
				code = 1
			}
		}
	}()
	return m.Run()
}

// needGateway skips an end-to-end test when there is no gateway to start.
func needGateway(t *testing.T) {
	t.Helper()
	if env == nil {
		t.Skip("not inside the llmrelay repo: no gateway to test against")
	}
}

// setup clears the upstream's faults and dials the shared gateway.
func setup(t *testing.T, opts ...llmrelay.Option) *llmrelay.Client {
	t.Helper()
	needGateway(t)
	if err := env.Upstream.ClearFaults(); err != nil {
		t.Fatal(err)
	}
	return dial(t, env.Target, opts...)
}

// setupFallback dials the gateway with two backends, and returns it too (for its upstream and log).
func setupFallback(t *testing.T, opts ...llmrelay.Option) (*llmrelay.Client, *gatewaytest.Gateway) {
	t.Helper()
	gateway := fallbackGateway.start(t)
	return dial(t, gateway.Target, opts...), gateway
}

// dial dials a gateway on loopback: in plaintext, by default.
func dial(t *testing.T, addr string, opts ...llmrelay.Option) *llmrelay.Client {
	t.Helper()
	client, err := llmrelay.Dial(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func chat(text string) []*llmrelayv1.Message {
	return []*llmrelayv1.Message{llmrelay.System("Be brief."), llmrelay.User(text)}
}

// mustFail asserts that err is an *Error with the code, and returns it.
func mustFail(t *testing.T, err error, code codes.Code) *llmrelay.Error {
	t.Helper()
	if err == nil {
		t.Fatalf("the call succeeded; want %s", code)
	}
	var e *llmrelay.Error
	if !errors.As(err, &e) {
		t.Fatalf("error %T %v is not an *llmrelay.Error", err, err)
	}
	if e.Code != code || status.Code(err) != code {
		t.Fatalf("code %s (status.Code: %s), want %s: %v", e.Code, status.Code(err), code, err)
	}
	return e
}

// collect reads a stream to its end.
func collect(t *testing.T, stream *llmrelay.Stream) ([]*llmrelayv1.StreamCompleteResponse, error) {
	t.Helper()
	var chunks []*llmrelayv1.StreamCompleteResponse
	for {
		chunk, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return chunks, nil
		}
		if err != nil {
			return chunks, err
		}
		chunks = append(chunks, chunk)
	}
}

func TestComplete(t *testing.T) {
	client := setup(t)
	resp, err := client.Complete(testContext(t), &llmrelayv1.CompleteRequest{Messages: chat("hello from Go")})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := resp.GetMessage().GetContent(), "echo: hello from Go"; got != want {
		t.Errorf("content %q, want %q", got, want)
	}
	if resp.GetMessage().GetRole() != llmrelayv1.Role_ROLE_ASSISTANT {
		t.Errorf("role %s", resp.GetMessage().GetRole())
	}
	if resp.GetBackend() != "ollama" || resp.GetModel() != "tiny" {
		t.Errorf("answered by %s/%s, want ollama/tiny", resp.GetBackend(), resp.GetModel())
	}
	if resp.GetFinishReason() != llmrelayv1.FinishReason_FINISH_REASON_STOP {
		t.Errorf("finish reason %s", resp.GetFinishReason())
	}
	if resp.GetUsage().GetTotalTokens() <= 0 {
		t.Errorf("usage %v", resp.GetUsage())
	}
	attempts := resp.GetAttempts()
	if len(attempts) == 0 || attempts[len(attempts)-1].GetOutcome() != llmrelayv1.AttemptOutcome_ATTEMPT_OUTCOME_SUCCEEDED {
		t.Errorf("attempts %v", attempts)
	}
}

func TestStreamMatchesComplete(t *testing.T) {
	client := setup(t)
	ctx := testContext(t)
	prompt := "stream these several words one by one"
	unary, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat(prompt)})
	if err != nil {
		t.Fatal(err)
	}
	// Words sent apart, so that the answer comes in pieces (the gateway joins pieces that arrive together).
	if err := env.Upstream.AddFaults(gatewaytest.Fault{"trickle_s": 0.01}); err != nil {
		t.Fatal(err)
	}
	stream, err := client.Stream(ctx, &llmrelayv1.StreamCompleteRequest{Messages: chat(prompt)})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	chunks, err := collect(t, stream)
	if err != nil {
		t.Fatal(err)
	}
	if len(chunks) < 3 {
		t.Fatalf("%d chunks; want the answer in several", len(chunks))
	}
	var text strings.Builder
	for i, chunk := range chunks {
		text.WriteString(chunk.GetDelta().GetContent())
		if chunk.GetId() != chunks[0].GetId() || chunk.GetBackend() != "ollama" {
			t.Errorf("chunk %d: id %q backend %q; want the same id throughout, backend ollama", i, chunk.GetId(), chunk.GetBackend())
		}
		last := i == len(chunks)-1
		if (chunk.GetFinishReason() != llmrelayv1.FinishReason_FINISH_REASON_UNSPECIFIED) != last {
			t.Errorf("chunk %d of %d has finish reason %s; want it on the last only", i, len(chunks), chunk.GetFinishReason())
		}
	}
	if got, want := text.String(), unary.GetMessage().GetContent(); got != want {
		t.Errorf("streamed %q, unary %q", got, want)
	}
	last := chunks[len(chunks)-1]
	if last.GetFinishReason() != llmrelayv1.FinishReason_FINISH_REASON_STOP || last.GetUsage().GetTotalTokens() <= 0 {
		t.Errorf("last chunk: finish %s usage %v", last.GetFinishReason(), last.GetUsage())
	}
}

func TestCountTokens(t *testing.T) {
	client := setup(t)
	ctx := testContext(t)
	text := "The quick brown fox jumps over the lazy dog."
	byText, err := client.CountTokens(ctx, &llmrelayv1.CountTokensRequest{Text: &text})
	if err != nil {
		t.Fatal(err)
	}
	if byText.GetTokenCount() < 5 || byText.GetEncoding() == "" {
		t.Errorf("text: %v", byText)
	}
	byChat, err := client.CountTokens(ctx, &llmrelayv1.CountTokensRequest{Messages: chat(text)})
	if err != nil {
		t.Fatal(err)
	}
	if byChat.GetTokenCount() <= byText.GetTokenCount() {
		t.Errorf("chat counted %d tokens, its text alone %d; want the chat's overhead on top", byChat.GetTokenCount(),
			byText.GetTokenCount())
	}
}

func TestEmbed(t *testing.T) {
	client := setup(t)
	ctx := testContext(t)
	texts := []string{"first text", "second text", "third text"}
	resp, err := client.Embed(ctx, &llmrelayv1.EmbedRequest{Inputs: texts})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetBackend() != "ollama" || resp.GetModel() != env.EmbeddingModel {
		t.Errorf("embedded by %s/%s, want ollama/%s", resp.GetBackend(), resp.GetModel(), env.EmbeddingModel)
	}
	if got := len(resp.GetEmbeddings()); got != len(texts) {
		t.Fatalf("%d vectors for %d texts", got, len(texts))
	}
	if resp.GetUsage().GetPromptTokens() != 6 || resp.GetUsage().GetEstimated() {
		t.Errorf("usage %v, want 6 tokens as the upstream counted them", resp.GetUsage())
	}
	// Vectors in input order: each text's vector is the one it gets on its own (the fake's are a function of the text).
	for i, text := range texts {
		alone, err := client.Embed(ctx, &llmrelayv1.EmbedRequest{Inputs: []string{text}})
		if err != nil {
			t.Fatal(err)
		}
		got, want := resp.GetEmbeddings()[i].GetValues(), alone.GetEmbeddings()[0].GetValues()
		if len(got) != 1536 || !slices.Equal(got, want) {
			t.Errorf("vector %d: %d dimensions, equal to its text's own: %t", i, len(got), slices.Equal(got, want))
		}
	}
	dimensions := int32(8)
	short, err := client.Embed(ctx, &llmrelayv1.EmbedRequest{Inputs: texts[:1], Dimensions: &dimensions})
	if err != nil {
		t.Fatal(err)
	}
	if got := len(short.GetEmbeddings()[0].GetValues()); got != 8 {
		t.Errorf("%d dimensions, want 8", got)
	}
}

func TestEmbedErrors(t *testing.T) {
	client := setup(t)
	ctx := testContext(t)
	_, err := client.Embed(ctx, &llmrelayv1.EmbedRequest{})
	e := mustFail(t, err, codes.InvalidArgument)
	if v := e.FieldViolations(); len(v) != 1 || v[0].GetField() != "inputs" {
		t.Errorf("field violations %v, want one on inputs", v)
	}
	model := "no-such-embedding-model"
	_, err = client.Embed(ctx, &llmrelayv1.EmbedRequest{Inputs: []string{"x"}, Model: &model})
	e = mustFail(t, err, codes.NotFound)
	if e.ErrorReason() != llmrelayv1.ErrorReason_ERROR_REASON_MODEL_NOT_FOUND {
		t.Errorf("reason %q, want MODEL_NOT_FOUND", e.Reason())
	}
}

func TestHealth(t *testing.T) {
	client := setup(t)
	resp, err := client.Health(testContext(t), true)
	if err != nil {
		t.Fatal(err)
	}
	if !resp.GetServing() || len(resp.GetBackends()) != 1 {
		t.Fatalf("health %v", resp)
	}
	backend := resp.GetBackends()[0]
	if backend.GetName() != "ollama" || !backend.GetReachable() || backend.GetDefaultModel() != "tiny" {
		t.Errorf("backend %v", backend)
	}
	if backend.GetCircuitState() != llmrelayv1.CircuitState_CIRCUIT_STATE_CLOSED {
		t.Errorf("circuit %s", backend.GetCircuitState())
	}
}

func TestRateLimitedCarriesErrorInfoAndRetryInfo(t *testing.T) {
	client := setup(t)
	if err := env.Upstream.AddFaults(gatewaytest.Fault{"status": 429, "retry_after": 3}); err != nil {
		t.Fatal(err)
	}
	_, err := client.Complete(testContext(t), &llmrelayv1.CompleteRequest{Messages: chat("too many")})
	e := mustFail(t, err, codes.ResourceExhausted)
	if e.Reason() != "UPSTREAM_RATE_LIMITED" || e.ErrorReason() != llmrelayv1.ErrorReason_ERROR_REASON_UPSTREAM_RATE_LIMITED {
		t.Errorf("reason %q (%s), want UPSTREAM_RATE_LIMITED", e.Reason(), e.ErrorReason())
	}
	if e.ErrorInfo.GetDomain() != llmrelay.Domain {
		t.Errorf("domain %q", e.ErrorInfo.GetDomain())
	}
	delay, ok := e.RetryDelay()
	if !ok || delay < 2500*time.Millisecond || delay > 3500*time.Millisecond {
		t.Errorf("retry delay %s (present: %t), want about the upstream's Retry-After, 3s", delay, ok)
	}
}

func TestStreamRateLimitedCarriesErrorInfoAndRetryInfo(t *testing.T) {
	client := setup(t)
	if err := env.Upstream.AddFaults(gatewaytest.Fault{"status": 429, "retry_after": 2}); err != nil {
		t.Fatal(err)
	}
	stream, err := client.Stream(testContext(t), &llmrelayv1.StreamCompleteRequest{Messages: chat("too many")})
	if err == nil {
		defer stream.Close()
		_, err = collect(t, stream)
	}
	e := mustFail(t, err, codes.ResourceExhausted)
	if e.Reason() != "UPSTREAM_RATE_LIMITED" {
		t.Errorf("reason %q", e.Reason())
	}
	if delay, ok := e.RetryDelay(); !ok || delay < 1500*time.Millisecond || delay > 2500*time.Millisecond {
		t.Errorf("retry delay %s (present: %t), want about 2s", delay, ok)
	}
}

// startGateway runs a harness of the test's own with opts (ConfigExtra: sections added to its gateway's
// configuration, such as caller keys and their limits), stopped after the test.
func startGateway(t *testing.T, opts gatewaytest.Options) *gatewaytest.Gateway {
	t.Helper()
	needGateway(t)
	gateway, err := gatewaytest.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := gateway.Close(); err != nil {
			t.Error(err)
		}
	})
	return gateway
}

func TestQuotaFailureSaysWhatToChange(t *testing.T) {
	const key = "llmr-go-quota-0123456789abcdefghij"
	gateway := startGateway(t, gatewaytest.Options{ConfigExtra: fmt.Sprintf(`auth:
  keys:
    - {name: limited, sha256: "%x", limits: {tokens_per_minute: 1000}}
`, sha256.Sum256([]byte(key)))})
	client := dial(t, gateway.Target, llmrelay.WithHeader("authorization", "Bearer "+key))
	// max_tokens alone reserves more than the key may use in a minute: no wait would admit the request.
	_, err := client.Complete(testContext(t), &llmrelayv1.CompleteRequest{
		Messages: chat("too big"), Options: &llmrelayv1.CompletionOptions{MaxTokens: proto.Int32(5000)},
	})
	e := mustFail(t, err, codes.ResourceExhausted)
	if e.Reason() != "TOKENS_PER_MINUTE_EXCEEDED" {
		t.Errorf("reason %q, want TOKENS_PER_MINUTE_EXCEEDED", e.Reason())
	}
	violations := e.QuotaViolations()
	if len(violations) != 1 || violations[0].GetSubject() != "key:limited" ||
		!strings.Contains(violations[0].GetDescription(), "set max_tokens to at most") {
		t.Fatalf("quota violations %v, want one of key:limited saying which max_tokens fits", violations)
	}
	if delay, ok := e.RetryDelay(); ok {
		t.Errorf("retry delay %s: a request that never fits has none", delay)
	}
}

func TestInvalidRequestNamesTheField(t *testing.T) {
	client := setup(t)
	_, err := client.Complete(testContext(t), &llmrelayv1.CompleteRequest{})
	e := mustFail(t, err, codes.InvalidArgument)
	if e.Reason() != "INVALID_REQUEST" || e.Attempts != nil {
		t.Errorf("reason %q, attempts %v; want INVALID_REQUEST, refused before any attempt", e.Reason(), e.Attempts)
	}
	var fields []string
	for _, v := range e.FieldViolations() {
		fields = append(fields, v.GetField())
	}
	if len(fields) == 0 || fields[0] != "messages" {
		t.Errorf("field violations %v, want one on messages", e.FieldViolations())
	}
}

func TestDeadlineWhileUpstreamStalls(t *testing.T) {
	client := setup(t)
	if err := env.Upstream.AddFaults(gatewaytest.Fault{"stall_s": 5}, gatewaytest.Fault{"stall_s": 5}); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	began := time.Now()
	_, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("slow")})
	mustFail(t, err, codes.DeadlineExceeded)
	if took := time.Since(began); took > 3*time.Second {
		t.Errorf("the call took %s with a 1s deadline", took)
	}

	ctx, cancel = context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	began = time.Now()
	stream, err := client.Stream(ctx, &llmrelayv1.StreamCompleteRequest{Messages: chat("slow")})
	if err == nil {
		defer stream.Close()
		_, err = collect(t, stream)
	}
	mustFail(t, err, codes.DeadlineExceeded)
	if took := time.Since(began); took > 3*time.Second {
		t.Errorf("the stream took %s with a 1s deadline", took)
	}
}

func TestDefaultTimeoutAppliesWithoutDeadline(t *testing.T) {
	client := setup(t, llmrelay.WithTimeout(time.Second))
	if err := env.Upstream.AddFaults(gatewaytest.Fault{"stall_s": 5}); err != nil {
		t.Fatal(err)
	}
	_, err := client.Complete(context.Background(), &llmrelayv1.CompleteRequest{Messages: chat("slow")})
	mustFail(t, err, codes.DeadlineExceeded)
}

func TestUnreachableBackendIsUnavailable(t *testing.T) {
	client := setup(t, llmrelay.WithServiceConfig("")) // no channel retries: the first failure is the answer
	if err := env.Upstream.AddFaults(gatewaytest.Fault{"drop": true}); err != nil {
		t.Fatal(err)
	}
	_, err := client.Complete(testContext(t), &llmrelayv1.CompleteRequest{Messages: chat("anyone?")})
	e := mustFail(t, err, codes.Unavailable)
	if e.Reason() != "BACKENDS_UNAVAILABLE" {
		t.Errorf("reason %q, want BACKENDS_UNAVAILABLE", e.Reason())
	}
	if len(e.Attempts) != 1 || e.Attempts[0].GetBackend() != "ollama" ||
		e.Attempts[0].GetOutcome() != llmrelayv1.AttemptOutcome_ATTEMPT_OUTCOME_UNREACHABLE {
		t.Errorf("attempts %v; want the one to ollama, UNREACHABLE", e.Attempts)
	}
	if strings.Contains(e.Message, "plaintext") {
		t.Errorf("message %q: an answer of the gateway's own, yet it speaks of the transport security", e.Message)
	}
}

func TestCallerIsRecordedInUsage(t *testing.T) {
	client := setup(t, llmrelay.WithCaller("go-e2e"))
	ctx := testContext(t)
	if _, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("count me")}); err != nil {
		t.Fatal(err)
	}
	caller := "go-e2e"
	usage, err := client.GetUsage(ctx, &llmrelayv1.GetUsageRequest{Caller: &caller})
	if err != nil {
		t.Fatalf("%v\ngateway log:\n%s", err, env.Log())
	}
	if len(usage.GetRecords()) != 1 || usage.GetRecords()[0].GetRequests() < 1 {
		t.Errorf("usage of caller go-e2e: %v", usage.GetRecords())
	}
}

func TestACallsOwnCallerReplacesTheClients(t *testing.T) {
	var sent []string // the callers the last call carried, as the channel sends them
	record := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker,
		opts ...grpc.CallOption) error {
		outgoing, _ := metadata.FromOutgoingContext(ctx)
		sent = outgoing.Get(llmrelay.CallerHeader)
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	client := setup(t, llmrelay.WithCaller("go-client-caller"), llmrelay.WithUnaryInterceptors(record))
	ctx := testContext(t)
	callCtx := metadata.AppendToOutgoingContext(ctx, llmrelay.CallerHeader, "go-call-caller")
	if _, err := client.Complete(callCtx, &llmrelayv1.CompleteRequest{Messages: chat("bill the call's caller")}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(sent, []string{"go-call-caller"}) {
		t.Errorf("the call sent the callers %q; want only its own", sent)
	}
	for caller, billed := range map[string]bool{"go-call-caller": true, "go-client-caller": false} {
		usage, err := client.GetUsage(ctx, &llmrelayv1.GetUsageRequest{Caller: &caller})
		if err != nil {
			t.Fatalf("%v\ngateway log:\n%s", err, env.Log())
		}
		if (len(usage.GetRecords()) > 0) != billed {
			t.Errorf("usage of caller %s: %v; want it billed: %t", caller, usage.GetRecords(), billed)
		}
	}
}

// cutPrompt is long enough that a stream cut after 3 upstream chunks has sent part of the answer, not all of it.
const cutPrompt = "recover from a stream cut in the middle of these words"

func TestCollectRestartsOnTheFallbackAfterACut(t *testing.T) {
	client, gateway := setupFallback(t)
	if err := gateway.Upstream.AddFaults(gatewaytest.Fault{"stream_cut_after": 3}); err != nil {
		t.Fatal(err)
	}
	var markers int
	var printed strings.Builder
	answer, err := client.Collect(testContext(t), &llmrelayv1.StreamCompleteRequest{Messages: chat(cutPrompt)},
		func(chunk *llmrelayv1.StreamCompleteResponse) {
			if chunk.GetRestart() != nil {
				markers++
				printed.Reset() // what was printed before the marker is void
			}
			printed.WriteString(chunk.GetDelta().GetContent())
		})
	if err != nil {
		t.Fatalf("%v\ngateway log:\n%s", err, gateway.Log())
	}
	want := "echo: " + cutPrompt
	if got := answer.GetMessage().GetContent(); got != want {
		t.Errorf("content %q, want exactly the fallback's answer %q", got, want)
	}
	if markers != 1 || printed.String() != want {
		t.Errorf("onChunk saw %d restart markers and %q after the last; want 1 and %q", markers, printed.String(), want)
	}
	if answer.GetBackend() != gateway.FallbackBackend {
		t.Errorf("backend %q, want %q", answer.GetBackend(), gateway.FallbackBackend)
	}
	if answer.GetFinishReason() != llmrelayv1.FinishReason_FINISH_REASON_STOP {
		t.Errorf("finish reason %s", answer.GetFinishReason())
	}
	attempts := answer.GetAttempts()
	if len(attempts) < 2 || attempts[0].GetBackend() != "ollama" ||
		attempts[0].GetOutcome() != llmrelayv1.AttemptOutcome_ATTEMPT_OUTCOME_INTERRUPTED ||
		attempts[len(attempts)-1].GetBackend() != gateway.FallbackBackend ||
		attempts[len(attempts)-1].GetOutcome() != llmrelayv1.AttemptOutcome_ATTEMPT_OUTCOME_SUCCEEDED {
		t.Errorf("attempts %v; want ollama INTERRUPTED first, %s SUCCEEDED last", attempts, gateway.FallbackBackend)
	}
	if answer.GetUsage().GetTotalTokens() <= 0 {
		t.Errorf("usage %v", answer.GetUsage())
	}
}

func TestStreamRestartMarkerAfterACut(t *testing.T) {
	client, gateway := setupFallback(t)
	if err := gateway.Upstream.AddFaults(gatewaytest.Fault{"stream_cut_after": 3}); err != nil {
		t.Fatal(err)
	}
	stream, err := client.Stream(testContext(t), &llmrelayv1.StreamCompleteRequest{
		Messages:    chat(cutPrompt),
		OnInterrupt: llmrelayv1.InterruptPolicy_INTERRUPT_POLICY_RESTART,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	chunks, err := collect(t, stream)
	if err != nil {
		t.Fatalf("%v\ngateway log:\n%s", err, gateway.Log())
	}
	marker := -1
	for i, chunk := range chunks {
		if chunk.GetRestart() == nil {
			continue
		}
		if marker >= 0 {
			t.Fatalf("restart markers at %d and %d; want exactly one", marker, i)
		}
		marker = i
	}
	if marker < 0 {
		t.Fatalf("no restart marker in %d chunks", len(chunks))
	}
	restart := chunks[marker]
	if restart.GetDelta() != nil || restart.GetBackend() != "" || restart.GetUsage() != nil || restart.GetFinishReason() != 0 {
		t.Errorf("the marker carries more than restart: %v", restart)
	}
	if r := restart.GetRestart(); r.GetBackend() != "ollama" || r.GetReason() == "" || len(r.GetAttempts()) == 0 ||
		r.GetAttempts()[len(r.GetAttempts())-1].GetOutcome() != llmrelayv1.AttemptOutcome_ATTEMPT_OUTCOME_INTERRUPTED {
		t.Errorf("marker %v; want backend ollama, a reason, the broken attempt last and INTERRUPTED", r)
	}
	var before, after strings.Builder
	for _, chunk := range chunks[:marker] {
		before.WriteString(chunk.GetDelta().GetContent())
	}
	for _, chunk := range chunks[marker+1:] {
		after.WriteString(chunk.GetDelta().GetContent())
		if chunk.GetBackend() != gateway.FallbackBackend {
			t.Errorf("after the marker, a chunk from %q", chunk.GetBackend())
		}
	}
	want := "echo: " + cutPrompt
	if before.Len() == 0 || before.Len() >= len(want) || !strings.HasPrefix(want, before.String()) {
		t.Errorf("before the marker %q; want a part of %q", before.String(), want)
	}
	if after.String() != want {
		t.Errorf("after the marker %q, want %q", after.String(), want)
	}
	last := chunks[len(chunks)-1]
	if last.GetUsage().GetTotalTokens() <= restart.GetRestart().GetUsage().GetTotalTokens() {
		t.Errorf("final usage %v, the broken attempt's %v; want the final to cover both", last.GetUsage(),
			restart.GetRestart().GetUsage())
	}
}

func TestStreamCutAbortsByDefault(t *testing.T) {
	client, gateway := setupFallback(t)
	if err := gateway.Upstream.AddFaults(gatewaytest.Fault{"stream_cut_after": 3}); err != nil {
		t.Fatal(err)
	}
	stream, err := client.Stream(testContext(t), &llmrelayv1.StreamCompleteRequest{Messages: chat(cutPrompt)})
	var chunks []*llmrelayv1.StreamCompleteResponse
	if err == nil {
		defer stream.Close()
		chunks, err = collect(t, stream)
	}
	e := mustFail(t, err, codes.Aborted)
	if e.Reason() != "STREAM_INTERRUPTED" || e.ErrorReason() != llmrelayv1.ErrorReason_ERROR_REASON_STREAM_INTERRUPTED {
		t.Errorf("reason %q, want STREAM_INTERRUPTED", e.Reason())
	}
	for _, chunk := range chunks {
		if chunk.GetRestart() != nil {
			t.Errorf("a restart marker without on_interrupt RESTART: %v", chunk)
		}
	}
	if len(chunks) == 0 {
		t.Errorf("no chunk before the cut; want the part the upstream sent")
	}
}

func TestCollectWithAbortPolicyFails(t *testing.T) {
	client, gateway := setupFallback(t)
	if err := gateway.Upstream.AddFaults(gatewaytest.Fault{"stream_cut_after": 3}); err != nil {
		t.Fatal(err)
	}
	answer, err := client.Collect(testContext(t), &llmrelayv1.StreamCompleteRequest{
		Messages:    chat(cutPrompt),
		OnInterrupt: llmrelayv1.InterruptPolicy_INTERRUPT_POLICY_ABORT,
	}, nil)
	e := mustFail(t, err, codes.Aborted)
	if e.Reason() != "STREAM_INTERRUPTED" || answer != nil {
		t.Errorf("reason %q, answer %v; want STREAM_INTERRUPTED and none", e.Reason(), answer)
	}
}

func TestParseErrorReadsTheStatusInsideWrappers(t *testing.T) {
	client := setup(t)
	ctx := testContext(t)
	_, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{})
	e := mustFail(t, err, codes.InvalidArgument)
	if got := llmrelay.ParseError(fmt.Errorf("step 3: %w", err)); got != e {
		t.Errorf("ParseError of a wrapped *Error gave %v; want the *Error itself", got)
	}

	_, raw := client.Stub().Complete(ctx, &llmrelayv1.CompleteRequest{})
	parsed := llmrelay.ParseError(fmt.Errorf("step 3: %w", raw))
	if parsed == nil || parsed.Message != e.Message || parsed.Reason() != "INVALID_REQUEST" {
		t.Errorf("ParseError of a wrapped stub error: %v; want the gateway's message %q and its reason", parsed, e.Message)
	}

	// The channel's retries (the default service config) give up after three attempts, and grpc-go wraps the last
	// attempt's status in "max retries exhausted: ...".
	client = setup(t)
	unavailable := gatewaytest.Fault{"status": 503, "retry_after": 1}
	if err := env.Upstream.AddFaults(unavailable, unavailable, unavailable); err != nil {
		t.Fatal(err)
	}
	_, err = client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("give up")})
	e = mustFail(t, err, codes.Unavailable)
	if !strings.HasPrefix(e.Message, "every backend failed") || e.Reason() != "BACKENDS_UNAVAILABLE" {
		t.Errorf("message %q, reason %q; want the gateway's own, BACKENDS_UNAVAILABLE", e.Message, e.Reason())
	}
}

func TestErrorCarriesTheRequestID(t *testing.T) {
	client := setup(t)
	ctx := testContext(t)
	withID := metadata.AppendToOutgoingContext(ctx, "x-request-id", "go-request-1")
	_, err := client.Complete(withID, &llmrelayv1.CompleteRequest{})
	if e := mustFail(t, err, codes.InvalidArgument); e.RequestID != "go-request-1" {
		t.Errorf("request id %q, want the call's own, go-request-1", e.RequestID)
	}

	_, err = client.Complete(ctx, &llmrelayv1.CompleteRequest{})
	if e := mustFail(t, err, codes.InvalidArgument); len(e.RequestID) != 32 {
		t.Errorf("request id %q; want the one the gateway made (32 hex digits)", e.RequestID)
	}

	if err := env.Upstream.AddFaults(gatewaytest.Fault{"status": 429, "retry_after": 1}); err != nil {
		t.Fatal(err)
	}
	stream, err := client.Stream(metadata.AppendToOutgoingContext(ctx, "x-request-id", "go-request-2"),
		&llmrelayv1.StreamCompleteRequest{Messages: chat("too many")})
	if err == nil {
		defer stream.Close()
		_, err = collect(t, stream)
	}
	if e := mustFail(t, err, codes.ResourceExhausted); e.RequestID != "go-request-2" {
		t.Errorf("stream: request id %q, want go-request-2", e.RequestID)
	}
}

func TestACallItsContextEndedUnwrapsToTheContextError(t *testing.T) {
	client := setup(t)
	if err := env.Upstream.AddFaults(gatewaytest.Fault{"stall_s": 5}, gatewaytest.Fault{"stall_s": 5}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(300*time.Millisecond, cancel)
	_, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("slow")})
	mustFail(t, err, codes.Canceled)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: errors.Is(%v, context.Canceled) is false", err)
	}

	ctx, cancel = context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err = client.Collect(ctx, &llmrelayv1.StreamCompleteRequest{Messages: chat("slow")}, nil)
	mustFail(t, err, codes.DeadlineExceeded)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("out of time: errors.Is(%v, context.DeadlineExceeded) is false", err)
	}

	// Cancelled by Close, not by its context: no context error to find.
	closing := setup(t)
	if err := env.Upstream.AddFaults(gatewaytest.Fault{"stall_s": 5}); err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(300*time.Millisecond, func() { _ = closing.Close() })
	_, err = closing.Complete(testContext(t), &llmrelayv1.CompleteRequest{Messages: chat("slow")})
	mustFail(t, err, codes.Canceled)
	if errors.Is(err, context.Canceled) {
		t.Errorf("closed: errors.Is(%v, context.Canceled) holds; the call's context was never cancelled", err)
	}
}

// A gateway whose server.max_message_bytes is raised (for large images) sends answers as large: the client kept
// gRPC's default receive limit (4 MiB), and an answer of 5 MB, billed, failed ResourceExhausted in it.
func TestAnAnswerOverGRPCsDefaultReceiveLimitReachesTheClient(t *testing.T) {
	needGateway(t)
	gateway, err := gatewaytest.Start(gatewaytest.Options{MaxMessageBytes: 20 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = gateway.Close() })
	if err := gateway.Upstream.AddFaults(gatewaytest.Fault{"huge_content": 5_000_000}); err != nil {
		t.Fatal(err)
	}
	resp, err := dial(t, gateway.Target).Complete(testContext(t), &llmrelayv1.CompleteRequest{Messages: chat("hi")})
	if err != nil {
		t.Fatal(err)
	}
	if got := len(resp.GetMessage().GetContent()); got != 5_000_000 {
		t.Errorf("answer of %d characters; want 5,000,000", got)
	}
}

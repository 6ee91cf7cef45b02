package llmrelay_test

// End-to-end tests of the agent helpers (Collect, the tool loop, Conversation), of the channel's retries and of the
// transport security rule, against the harness's real gateway and loopback upstream.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/llmrelay/llmrelay/client/go/internal/gatewaytest"
	"github.com/llmrelay/llmrelay/client/go/llmrelay"
	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

func TestCollectMatchesComplete(t *testing.T) {
	twoCalls := gatewaytest.Fault{"tool_calls": []map[string]string{
		{"name": "get_weather", "arguments": `{"city": "Paris", "unit": "celsius"}`},
		{"name": "add", "arguments": `{"a": 2, "b": 3}`},
	}}
	cases := []struct {
		name  string
		fault gatewaytest.Fault // queued for each of the two calls; nil for none
	}{
		{"content", nil},
		{"reasoning", gatewaytest.Fault{"reasoning": "thinking it over first"}},
		{"tool calls", twoCalls},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			client := setup(t)
			ctx := testContext(t)
			if c.fault != nil {
				if err := env.Upstream.AddFaults(c.fault, c.fault); err != nil {
					t.Fatal(err)
				}
			}
			prompt := "collect these several words into one answer"
			unary, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat(prompt)})
			if err != nil {
				t.Fatal(err)
			}
			var printed strings.Builder
			collected, err := client.Collect(ctx, &llmrelayv1.StreamCompleteRequest{Messages: chat(prompt)},
				llmrelay.PrintTo(&printed))
			if err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(collected.GetMessage(), unary.GetMessage()) {
				t.Errorf("collected message %v\nComplete's %v", collected.GetMessage(), unary.GetMessage())
			}
			if printed.String() != collected.GetMessage().GetContent() {
				t.Errorf("printed %q as it came, the answer is %q", printed.String(), collected.GetMessage().GetContent())
			}
			if collected.GetId() != unary.GetId() || collected.GetBackend() != unary.GetBackend() ||
				collected.GetModel() != unary.GetModel() || collected.GetFinishReason() != unary.GetFinishReason() {
				t.Errorf("collected %s from %s/%s (%s), Complete %s from %s/%s (%s)", collected.GetId(),
					collected.GetBackend(), collected.GetModel(), collected.GetFinishReason(), unary.GetId(),
					unary.GetBackend(), unary.GetModel(), unary.GetFinishReason())
			}
			if !proto.Equal(collected.GetUsage(), unary.GetUsage()) || collected.GetUsage().GetTotalTokens() <= 0 {
				t.Errorf("collected usage %v, Complete's %v", collected.GetUsage(), unary.GetUsage())
			}
			if got, want := attemptSummary(collected.GetAttempts()), attemptSummary(unary.GetAttempts()); got != want {
				t.Errorf("collected attempts %s, Complete's %s", got, want)
			}
		})
	}
}

// attemptSummary is each attempt's backend and outcome, what two calls answered alike share (not their timing).
func attemptSummary(attempts []*llmrelayv1.Attempt) string {
	var parts []string
	for _, attempt := range attempts {
		parts = append(parts, attempt.GetBackend()+":"+attempt.GetOutcome().String())
	}
	return strings.Join(parts, ",")
}

type weatherArgs struct {
	City string `json:"city" description:"The city, e.g. Paris"`
	Unit string `json:"unit,omitempty" enum:"celsius,fahrenheit"`
}

type sumArgs struct {
	A int `json:"a"`
	B int `json:"b"`
}

// agentTools are a weather tool (typed, a string result) and an adder (typed, a struct result).
func agentTools(t *testing.T) []llmrelay.Tool {
	weather := mustTool(t)(llmrelay.NewTool("get_weather", "The weather now in a city",
		func(_ context.Context, args weatherArgs) (string, error) {
			return "sunny in " + args.City, nil
		}))
	add := mustTool(t)(llmrelay.NewTool("add", "Adds two integers", func(_ context.Context, args sumArgs) (sum, error) {
		return sum{args.A + args.B}, nil
	}))
	return []llmrelay.Tool{weather, add}
}

// usageRecorder is a unary interceptor that keeps the usage of each Complete answer.
type usageRecorder struct {
	mu     sync.Mutex
	usages []*llmrelayv1.Usage
}

func (r *usageRecorder) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
	invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	if answer, ok := reply.(*llmrelayv1.CompleteResponse); ok && err == nil {
		r.mu.Lock()
		r.usages = append(r.usages, answer.GetUsage())
		r.mu.Unlock()
	}
	return err
}

func TestAgentRunsTwoToolsOverSeveralSteps(t *testing.T) {
	for _, streaming := range []bool{false, true} {
		t.Run(fmt.Sprintf("streaming=%t", streaming), func(t *testing.T) {
			var recorder usageRecorder
			client := setup(t, llmrelay.WithUnaryInterceptors(recorder.intercept))
			if err := env.Upstream.AddFaults(
				gatewaytest.Fault{"tool_calls": []map[string]string{
					{"name": "get_weather", "arguments": `{"city": "Paris"}`},
					{"name": "add", "arguments": `{"a": 2, "b": 3}`},
				}},
				gatewaytest.Fault{"tool_calls": []map[string]string{{"name": "get_weather", "arguments": `{"city": "Oslo"}`}}},
				gatewaytest.Fault{"echo_tools": true},
			); err != nil {
				t.Fatal(err)
			}
			before, err := env.Upstream.Requests()
			if err != nil {
				t.Fatal(err)
			}
			var printed strings.Builder
			var toolCalls []string
			agent := &llmrelay.Agent{
				Client: client,
				Tools:  agentTools(t),
				OnToolResult: func(call *llmrelayv1.ToolCall, result *llmrelayv1.Message) {
					toolCalls = append(toolCalls, call.GetFunction().GetName()+"->"+result.GetContent())
				},
			}
			if streaming {
				agent.OnChunk = llmrelay.PrintTo(&printed)
			}
			conversation := llmrelay.NewConversation(chat("What is the weather in Paris and Oslo, and 2+3?")...)
			result, err := agent.Run(testContext(t), conversation)
			if err != nil {
				t.Fatalf("%v\ngateway log:\n%s", err, env.Log())
			}

			want := `tools: get_weather=sunny in Paris; add={"sum":5}; get_weather=sunny in Oslo`
			if got := result.Answer.GetMessage().GetContent(); got != want {
				t.Errorf("final answer %q, want %q", got, want)
			}
			if streaming && !strings.HasSuffix(printed.String(), want) {
				t.Errorf("printed %q as it came; want it to end with the final answer", printed.String())
			}
			if got := strings.Join(toolCalls, " | "); got !=
				`get_weather->sunny in Paris | add->{"sum":5} | get_weather->sunny in Oslo` {
				t.Errorf("tool calls seen: %s", got)
			}
			if result.Steps != 3 || len(result.Attempts) != 3 {
				t.Errorf("%d steps, %d attempts; want 3 of each", result.Steps, len(result.Attempts))
			}
			// system, user; assistant with two calls, two results; assistant with one call, one result; the answer.
			roles := []llmrelayv1.Role{llmrelayv1.Role_ROLE_SYSTEM, llmrelayv1.Role_ROLE_USER,
				llmrelayv1.Role_ROLE_ASSISTANT, llmrelayv1.Role_ROLE_TOOL, llmrelayv1.Role_ROLE_TOOL,
				llmrelayv1.Role_ROLE_ASSISTANT, llmrelayv1.Role_ROLE_TOOL, llmrelayv1.Role_ROLE_ASSISTANT}
			if len(conversation.Messages) != len(roles) || len(result.Messages) != len(roles)-2 {
				t.Fatalf("%d messages in the conversation, %d added by the run; want %d and %d",
					len(conversation.Messages), len(result.Messages), len(roles), len(roles)-2)
			}
			for i, message := range conversation.Messages {
				if message.GetRole() != roles[i] {
					t.Errorf("message %d is %s, want %s", i, message.GetRole(), roles[i])
				}
			}
			if id := conversation.Messages[4].GetToolCallId(); id != "call_2_2" {
				t.Errorf("the second tool result answers %q, want call_2_2", id)
			}

			after, err := env.Upstream.Requests()
			if err != nil {
				t.Fatal(err)
			}
			if len(after)-len(before) != 3 {
				t.Fatalf("the upstream got %d requests, want 3", len(after)-len(before))
			}
			var last struct {
				Tools []struct {
					Function struct{ Name string } `json:"function"`
				} `json:"tools"`
				Messages []struct {
					Role string  `json:"role"`
					Name *string `json:"name"`
				} `json:"messages"`
			}
			if err := json.Unmarshal(after[len(after)-1], &last); err != nil {
				t.Fatal(err)
			}
			if len(last.Tools) != 2 || last.Tools[0].Function.Name != "get_weather" || last.Tools[1].Function.Name != "add" {
				t.Errorf("the last request offered %+v; want get_weather and add", last.Tools)
			}
			// Each tool result names its function, as the other SDKs' do, and the gateway sends it on.
			var named []string
			for _, message := range last.Messages {
				if message.Role == "tool" {
					name := "<none>"
					if message.Name != nil {
						name = *message.Name
					}
					named = append(named, name)
				}
			}
			if got := strings.Join(named, " "); got != "get_weather add get_weather" {
				t.Errorf("the last request's tool results name %q; want each its function", got)
			}

			if !streaming {
				var want *llmrelayv1.Usage
				for _, usage := range recorder.usages {
					want = addUsage(want, usage)
				}
				if len(recorder.usages) != 3 || !proto.Equal(result.Usage, want) {
					t.Errorf("usage %v; the %d steps' summed: %v", result.Usage, len(recorder.usages), want)
				}
			} else if result.Usage.GetPromptTokens() <= result.Answer.GetUsage().GetPromptTokens() {
				t.Errorf("usage %v, the last step's %v: want the sum of the three", result.Usage, result.Answer.GetUsage())
			}
		})
	}
}

// addUsage sums the token counts the fake upstream reports (it reports no cost or cache figures).
func addUsage(total, usage *llmrelayv1.Usage) *llmrelayv1.Usage {
	if total == nil {
		return proto.CloneOf(usage)
	}
	return &llmrelayv1.Usage{
		PromptTokens:     total.GetPromptTokens() + usage.GetPromptTokens(),
		CompletionTokens: total.GetCompletionTokens() + usage.GetCompletionTokens(),
		TotalTokens:      total.GetTotalTokens() + usage.GetTotalTokens(),
		Estimated:        total.GetEstimated() || usage.GetEstimated(),
		Cost:             usage.GetCost(),
	}
}

func TestAgentToolFailuresBecomeResults(t *testing.T) {
	client := setup(t)
	failing := mustTool(t)(llmrelay.NewTool("lookup", "", func(context.Context, struct{}) (string, error) {
		return "", errors.New("the index is offline")
	}))
	if err := env.Upstream.AddFaults(
		gatewaytest.Fault{"tool_calls": []map[string]string{
			{"name": "lookup", "arguments": "{}"},
			{"name": "translate", "arguments": "{}"},
			{"name": "get_weather", "arguments": `{"town": "Paris"}`},
		}},
		gatewaytest.Fault{"echo_tools": true},
	); err != nil {
		t.Fatal(err)
	}
	agent := &llmrelay.Agent{Client: client, Tools: append(agentTools(t), failing)}
	result, err := agent.Run(testContext(t), llmrelay.NewConversation(chat("look it up")...))
	if err != nil {
		t.Fatal(err)
	}
	answer := result.Answer.GetMessage().GetContent()
	for _, want := range []string{
		`lookup=error: tool "lookup" failed: the index is offline`,
		`translate=error: there is no tool "translate"; the tools are: add, get_weather, lookup`,
		`get_weather=error: tool "get_weather" cannot take the arguments {"town": "Paris"}`,
	} {
		if !strings.Contains(answer, want) {
			t.Errorf("final answer %q; want it to hold %q", answer, want)
		}
	}
}

func TestAgentTakesToolResultsThatAreNotUTF8(t *testing.T) {
	client := setup(t)
	// Latin-1 bytes, as os.ReadFile gives them: they failed the next model call, and every later one, with Internal
	// "string field contains invalid UTF-8", the bad tool message staying in the conversation.
	readFile := mustTool(t)(llmrelay.NewTool("read_file", "", func(context.Context, struct{}) (string, error) {
		return "caf\xe9 cr\xe8me", nil
	}))
	failing := mustTool(t)(llmrelay.NewTool("lookup", "", func(context.Context, struct{}) (string, error) {
		return "", errors.New("no file na\xefve.txt")
	}))
	calls := gatewaytest.Fault{"tool_calls": []map[string]string{
		{"name": "read_file", "arguments": "{}"},
		{"name": "lookup", "arguments": "{}"},
	}}
	if err := env.Upstream.AddFaults(calls, gatewaytest.Fault{"echo_tools": true}, gatewaytest.Fault{"echo_tools": true}); err != nil {
		t.Fatal(err)
	}
	conversation := llmrelay.NewConversation(chat("what is on the menu?")...)
	agent := &llmrelay.Agent{Client: client, Tools: []llmrelay.Tool{readFile, failing}}
	result, err := agent.Run(testContext(t), conversation)
	if err != nil {
		t.Fatal(err)
	}
	answer := result.Answer.GetMessage().GetContent()
	for _, want := range []string{"read_file=caf\uFFFD cr\uFFFDme", "lookup=error: tool \"lookup\" failed: no file na\uFFFDve.txt"} {
		if !strings.Contains(answer, want) {
			t.Errorf("final answer %q; want it to hold %q", answer, want)
		}
	}
	conversation.Add(llmrelay.User("and then?"))
	if _, err := agent.Run(testContext(t), conversation); err != nil {
		t.Errorf("the conversation cannot go on: %v", err)
	}
}

func TestAgentStopsAtItsStepLimit(t *testing.T) {
	client := setup(t)
	again := gatewaytest.Fault{"tool_calls": []map[string]string{{"name": "add", "arguments": `{"a": 1, "b": 1}`}}}
	if err := env.Upstream.AddFaults(again, again, again); err != nil {
		t.Fatal(err)
	}
	conversation := llmrelay.NewConversation(chat("count forever")...)
	agent := &llmrelay.Agent{Client: client, Tools: agentTools(t), MaxSteps: 2}
	_, err := agent.Run(testContext(t), conversation)
	var limit *llmrelay.StepLimitError
	if !errors.As(err, &limit) {
		t.Fatalf("error %v, want a *StepLimitError", err)
	}
	if limit.MaxSteps != 2 || limit.Result.Steps != 2 || limit.Result.Usage.GetTotalTokens() <= 0 {
		t.Errorf("limit %d, %d steps, usage %v", limit.MaxSteps, limit.Result.Steps, limit.Result.Usage)
	}
	last := conversation.Messages[len(conversation.Messages)-1]
	if last.GetRole() != llmrelayv1.Role_ROLE_TOOL || last.GetContent() != `{"sum":2}` {
		t.Errorf("the conversation ends with %v; want the last step's tool result, to go on from", last)
	}
}

func TestConversationFitsItsTokenBudget(t *testing.T) {
	client := setup(t)
	ctx := testContext(t)
	turn := func(question, answer string) []*llmrelayv1.Message {
		return []*llmrelayv1.Message{llmrelay.User(question), llmrelay.Assistant(answer)}
	}
	conversation := llmrelay.NewConversation(llmrelay.System("Be brief."))
	conversation.Add(turn("the first question, with quite a few words in it", "the first answer, also long-winded")...)
	conversation.Add(turn("the second question, with quite a few words in it", "the second answer, long-winded too")...)
	conversation.Add(llmrelay.User("the last question"))
	all, err := conversation.CountTokens(ctx, client)
	if err != nil {
		t.Fatal(err)
	}
	last := llmrelay.NewConversation(llmrelay.System("Be brief."), llmrelay.User("the last question"))
	minimum, err := last.CountTokens(ctx, client)
	if err != nil {
		t.Fatal(err)
	}
	if minimum >= all {
		t.Fatalf("the last turn alone counts %d tokens, the whole chat %d", minimum, all)
	}

	// Even the system message and the last question are over the budget: nothing is dropped, and a larger budget
	// still has the whole history to keep.
	whole := &llmrelayv1.CompleteRequest{Messages: slices.Clone(conversation.Messages)}
	conversation.TokenBudget = minimum - 1
	dropped, err := conversation.Fit(ctx, client)
	var over *llmrelay.BudgetError
	if !errors.As(err, &over) || over.Tokens != minimum || over.Budget != minimum-1 || dropped != 0 {
		t.Errorf("error %v, %d dropped; want a *BudgetError of %d tokens over %d", err, dropped, minimum, minimum-1)
	}
	if !proto.Equal(&llmrelayv1.CompleteRequest{Messages: conversation.Messages}, whole) {
		t.Errorf("left %v after the BudgetError; want the messages as they were", conversation.Messages)
	}

	conversation.TokenBudget = minimum
	dropped, err = conversation.Fit(ctx, client)
	if err != nil {
		t.Fatal(err)
	}
	if dropped != 4 || !proto.Equal(&llmrelayv1.CompleteRequest{Messages: conversation.Messages},
		&llmrelayv1.CompleteRequest{Messages: last.Messages}) {
		t.Errorf("dropped %d messages, left %v; want the two old turns gone, the system message and last question kept",
			dropped, conversation.Messages)
	}
}

// An agent's run fits the conversation with the tokenizer of the model it asks: the conversation's, else the
// agent's (counted for the default chain's, a chat could fit its budget where the model's tokenizer says it does not).
func TestAgentCountsTheConversationForItsModel(t *testing.T) {
	var mu sync.Mutex
	var counted []string // the model of each CountTokens, "<none>" where unset
	record := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker,
		opts ...grpc.CallOption) error {
		if count, ok := req.(*llmrelayv1.CountTokensRequest); ok {
			model := "<none>"
			if count.Model != nil {
				model = count.GetModel()
			}
			mu.Lock()
			counted = append(counted, model)
			mu.Unlock()
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	client := setup(t, llmrelay.WithUnaryInterceptors(record))
	agent := &llmrelay.Agent{Client: client, Model: "ollama/tiny"}
	for _, c := range []struct {
		conversationModel, want string
	}{{"", "ollama/tiny"}, {"gpt-4o", "gpt-4o"}} {
		counted = nil
		conversation := llmrelay.NewConversation(chat("count me")...)
		conversation.TokenBudget, conversation.Model = 100000, c.conversationModel
		result, err := agent.Run(testContext(t), conversation)
		if err != nil {
			t.Fatal(err)
		}
		if result.Answer.GetMessage().GetContent() != "echo: count me" {
			t.Errorf("answer %q", result.Answer.GetMessage().GetContent())
		}
		if !slices.Equal(counted, []string{c.want}) {
			t.Errorf("conversation model %q: counted for %q; want %q", c.conversationModel, counted, c.want)
		}
	}
	// Conversation.CountTokens, outside a run, counts for the conversation's model only.
	counted = nil
	if _, err := llmrelay.NewConversation(chat("count me")...).CountTokens(testContext(t), client); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(counted, []string{"<none>"}) {
		t.Errorf("CountTokens counted for %q; want no model named", counted)
	}
}

// The schema an agent's answers must follow goes into their prompts: its run counts it against the budget too.
func TestAgentCountsItsAnswerFormatAgainstTheBudget(t *testing.T) {
	client := setup(t)
	format := &llmrelayv1.ResponseFormat{Type: llmrelayv1.ResponseFormatType_RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
		JsonSchema: &llmrelayv1.JsonSchema{Name: "forecast",
			SchemaJson: proto.String(`{"type": "object", "properties": {"summary": {"type": "string"}}}`)}}
	messages := chat("weather in Oslo?")
	model := "gpt-4o"
	withFormat, err := client.CountTokens(testContext(t),
		&llmrelayv1.CountTokensRequest{Model: &model, Messages: messages, ResponseFormat: format})
	if err != nil {
		t.Fatal(err)
	}
	alone, err := client.CountTokens(testContext(t), &llmrelayv1.CountTokensRequest{Model: &model, Messages: messages})
	if err != nil {
		t.Fatal(err)
	}
	if withFormat.GetTokenCount() <= alone.GetTokenCount() {
		t.Fatalf("with the schema %d tokens, without %d", withFormat.GetTokenCount(), alone.GetTokenCount())
	}
	options := &llmrelayv1.CompletionOptions{ResponseFormat: format}
	agent := &llmrelay.Agent{Client: client, Model: model, Options: options}
	conversation := llmrelay.NewConversation(messages...)
	conversation.Model = model
	if counted, err := conversation.CountTokensFor(testContext(t), client, options); err != nil ||
		counted != int(withFormat.GetTokenCount()) {
		t.Fatalf("CountTokensFor: %d, %v; want %d", counted, err, withFormat.GetTokenCount())
	}
	conversation.TokenBudget = int(withFormat.GetTokenCount()) - 1 // the chat alone fits it; not with its schema
	var over *llmrelay.BudgetError
	if _, err := conversation.FitFor(testContext(t), client, options); !errors.As(err, &over) {
		t.Fatalf("FitFor: %v; want a BudgetError", err)
	}
	_, err = agent.Run(testContext(t), conversation)
	if !errors.As(err, &over) || over.Tokens != int(withFormat.GetTokenCount()) {
		t.Fatalf("run: %v; want a BudgetError of %d tokens", err, withFormat.GetTokenCount())
	}
}

func TestWithoutDeadlineOutlastsTheDefaultTimeout(t *testing.T) {
	client := setup(t, llmrelay.WithTimeout(500*time.Millisecond))
	if err := env.Upstream.AddFaults(gatewaytest.Fault{"stall_s": 1.5}); err != nil {
		t.Fatal(err)
	}
	answer, err := client.Complete(llmrelay.WithoutDeadline(context.Background()),
		&llmrelayv1.CompleteRequest{Messages: chat("take your time")})
	if err != nil {
		t.Fatalf("a call without a deadline failed: %v", err)
	}
	if answer.GetMessage().GetContent() != "echo: take your time" {
		t.Errorf("answer %q", answer.GetMessage().GetContent())
	}
}

func TestChannelRetriesAfterThePushback(t *testing.T) {
	cases := []struct {
		name string
		call func(client *llmrelay.Client, ctx context.Context) (string, error)
	}{
		{"Complete", func(client *llmrelay.Client, ctx context.Context) (string, error) {
			answer, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("try again")})
			return answer.GetMessage().GetContent(), err
		}},
		{"Collect", func(client *llmrelay.Client, ctx context.Context) (string, error) {
			answer, err := client.Collect(ctx, &llmrelayv1.StreamCompleteRequest{Messages: chat("try again")}, nil)
			return answer.GetMessage().GetContent(), err
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			client := setup(t) // the default service config: the channel retries UNAVAILABLE
			if err := env.Upstream.AddFaults(gatewaytest.Fault{"status": 503, "retry_after": 1}); err != nil {
				t.Fatal(err)
			}
			before, err := env.Upstream.Requests()
			if err != nil {
				t.Fatal(err)
			}
			began := time.Now()
			content, err := c.call(client, testContext(t))
			took := time.Since(began)
			if err != nil {
				t.Fatalf("the call failed: %v; want the channel to retry it", err)
			}
			after, err := env.Upstream.Requests()
			if err != nil {
				t.Fatal(err)
			}
			if content != "echo: try again" || len(after)-len(before) != 2 {
				t.Errorf("answer %q after %d upstream requests; want the echo after 2", content, len(after)-len(before))
			}
			// The gateway's grpc-retry-pushback-ms (the upstream's Retry-After, 1s) sets the wait, not the service
			// config's backoff (at most 0.25s before the second attempt).
			if took < 900*time.Millisecond {
				t.Errorf("the retry came after %s; want the gateway's pushback, about 1s, honoured", took)
			}
		})
	}
}

func TestTransportSecurityRule(t *testing.T) {
	gateway := tlsGateway.start(t)
	ctx := testContext(t)
	config, err := llmrelay.TLSConfig(gateway.CAFile, "", "")
	if err != nil {
		t.Fatal(err)
	}
	port := gateway.Target[strings.LastIndex(gateway.Target, ":")+1:]
	for _, target := range []string{gateway.Target, "localhost:" + port, "dns:///localhost:" + port} {
		client := dial(t, target, llmrelay.WithTLS(config))
		answer, err := client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("over TLS")})
		if err != nil {
			t.Errorf("%s over TLS with the CA: %v", target, err)
			continue
		}
		if answer.GetMessage().GetContent() != "echo: over TLS" {
			t.Errorf("%s: answer %q", target, answer.GetMessage().GetContent())
		}
	}

	// By default a loopback target gets plaintext, which a TLS gateway does not speak: the error says so.
	_, err = dial(t, gateway.Target).Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("in plaintext")})
	e := mustFail(t, err, codes.Unavailable)
	t.Logf("a default client to a TLS gateway on loopback: %v", e)
	for _, want := range []string{"plaintext", "loopback", "llmrelay.WithTLS"} {
		if !strings.Contains(e.Error(), want) {
			t.Errorf("error %q; want it to say %q", e.Error(), want)
		}
	}

	// TLS with the system's roots does not trust the harness's CA.
	_, err = dial(t, gateway.Target, llmrelay.WithTLS(nil)).Complete(ctx,
		&llmrelayv1.CompleteRequest{Messages: chat("unverified")})
	e = mustFail(t, err, codes.Unavailable)
	if !strings.Contains(e.Error(), "certificate") || strings.Contains(e.Error(), "plaintext") {
		t.Errorf("error %q; want the certificate's failure, without a hint: the caller chose TLS", e.Error())
	}
}

// A gateway that goes away mid-stream (SIGKILLed after some chunks) was reached: the stream's error does not guess at
// the transport security, which the hint above is for. Collect and the agent read streams through Recv too.
func TestStreamCutByAGatewayThatDiedHasNoSecurityHint(t *testing.T) {
	needGateway(t)
	gateway, err := gatewaytest.Start(gatewaytest.Options{}) // its own, for this test kills it
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = gateway.Close() }) // the harness says its gateway died: it did, by this test's hand
	process, err := os.FindProcess(gateway.PID)
	if err != nil {
		t.Fatal(err)
	}
	// One delta every 2s: the gateway is still streaming when it is killed, however late a busy machine runs the
	// test after its second chunk (the kill comes then, so the wait costs nothing).
	if err := gateway.Upstream.AddFaults(gatewaytest.Fault{"trickle_s": 2}); err != nil {
		t.Fatal(err)
	}
	client := dial(t, gateway.Target) // plaintext by default, as the gateway serves: a hint would mislead
	stream, err := client.Stream(testContext(t), &llmrelayv1.StreamCompleteRequest{
		Messages: chat("one two three four five six seven eight nine ten")})
	if err != nil {
		t.Fatal(err)
	}
	received := 0
	for {
		_, err = stream.Recv()
		if err != nil {
			break
		}
		if received++; received == 2 {
			if err := process.Kill(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if received != 2 {
		t.Fatalf("the stream ended after %d chunks (%v); want 2, then the gateway's death", received, err)
	}
	e := mustFail(t, err, codes.Unavailable)
	t.Logf("a stream cut by the gateway's death: %v", e)
	for _, hint := range []string{"plaintext", "WithTLS", "loopback"} {
		if strings.Contains(e.Error(), hint) {
			t.Errorf("error %q says %q: the gateway answered, so its transport security was right", e.Error(), hint)
		}
	}
}

// forward relays TCP connections from a loopback address of its own to target until stop, which closes them all: a
// gateway that goes away (a restart), with no process to kill.
func forward(t *testing.T, target string) (address string, stop func()) {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	go func() {
		for {
			client, err := listener.Accept()
			if err != nil {
				return
			}
			upstream, err := net.Dial("tcp", target)
			if err != nil {
				_ = client.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, client, upstream)
			mu.Unlock()
			go func() { _, _ = io.Copy(upstream, client) }()
			go func() { _, _ = io.Copy(client, upstream) }()
		}
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			_ = listener.Close()
			mu.Lock()
			defer mu.Unlock()
			for _, conn := range conns {
				_ = conn.Close()
			}
		})
	}
	t.Cleanup(stop)
	return listener.Addr().String(), stop
}

// A gateway that refused a call (INVALID_ARGUMENT) answered it: its error comes trailers-only, without response
// headers, but the transport security was right all the same. When the gateway then goes away, the next call's
// UNAVAILABLE does not tell the client to dial with TLS; a client that never reached it still is.
func TestAGatewayThatRefusedACallWasReached(t *testing.T) {
	needGateway(t)
	mustHaveHint := func(t *testing.T, err error, want bool) {
		t.Helper()
		e := mustFail(t, err, codes.Unavailable)
		for _, hint := range []string{"plaintext", "WithTLS", "loopback"} {
			if strings.Contains(e.Error(), hint) != want {
				t.Errorf("error %q: saying %q is %t; want %t", e.Error(), hint, !want, want)
			}
		}
	}
	for _, call := range []string{"Complete", "Stream"} {
		t.Run(call, func(t *testing.T) {
			address, stop := forward(t, env.Target)
			client := dial(t, address, llmrelay.WithServiceConfig("")) // no retries: the same message, sooner
			ctx := testContext(t)
			var err error
			if call == "Complete" {
				_, err = client.Complete(ctx, &llmrelayv1.CompleteRequest{})
			} else {
				err = streamError(t, client, &llmrelayv1.StreamCompleteRequest{})
			}
			e := mustFail(t, err, codes.InvalidArgument)
			t.Logf("the refused call: %v (request id %q)", e, e.RequestID)
			stop()
			_, err = client.Complete(ctx, &llmrelayv1.CompleteRequest{Messages: chat("hi")})
			t.Logf("the call after the gateway went away: %v", err)
			mustHaveHint(t, err, false)
		})
	}
	// The same gateway gone before any call: the hint is this test's to see.
	address, stop := forward(t, env.Target)
	stop()
	_, err := dial(t, address, llmrelay.WithServiceConfig("")).Complete(testContext(t),
		&llmrelayv1.CompleteRequest{Messages: chat("hi")})
	mustHaveHint(t, err, true)
}

// A gateway with mutual TLS closes the connection of a client it does not take without a word (gRPC's core sends no
// alert): grpc-go says only "error reading server preface: EOF" or "write: broken pipe". The message then ends with
// what to give the gateway, a client certificate or one its client CA issued; failures the client can tell itself (a
// server it does not trust, a plaintext gateway) keep their own words, with no hint of client certificates.
func TestAGatewayThatAsksForAClientCertificateIsToldOf(t *testing.T) {
	mutual := mutualTLSGateway.start(t)
	tlsConfig := func(certFile, keyFile string) *tls.Config {
		config, err := llmrelay.TLSConfig(mutual.CAFile, certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		return config
	}
	noCertificate := "(if the gateway asks for a client certificate (mutual TLS), this client gave none: dial with " +
		"llmrelay.WithTLS and a tls.Config whose Certificates hold one its server.tls.client_ca_file trusts)"
	notTaken := "(if the gateway asks for a client certificate (mutual TLS), it did not take this client's: it must " +
		"be issued by a CA in the gateway's server.tls.client_ca_file)"
	cases := []struct {
		name   string
		target string
		config *tls.Config
		said   string // what grpc-go says where the hint is not for it
		hint   string // "": none
	}{
		{"no client certificate", mutual.Target, tlsConfig("", ""), "", noCertificate},
		{"one of another CA", mutual.Target, tlsConfig(mutual.OtherClientCertFile, mutual.OtherClientKeyFile), "",
			notTaken},
		{"a server it does not trust", mutual.Target, &tls.Config{RootCAs: x509.NewCertPool()},
			"x509: certificate signed by unknown authority", ""},
		{"a plaintext gateway", env.Target, tlsConfig("", ""), "first record does not look like a TLS handshake", ""},
	}
	ctx := testContext(t)
	for _, c := range cases {
		client := dial(t, c.target, llmrelay.WithTLS(c.config))
		_, err := client.Health(ctx, false)
		unary := mustFail(t, err, codes.Unavailable)
		// A stream's too: nothing came from the gateway.
		stream, err := client.Stream(ctx, &llmrelayv1.StreamCompleteRequest{Messages: chat("over mutual TLS")})
		if err == nil {
			_, err = stream.Recv()
		}
		streamed := mustFail(t, err, codes.Unavailable)
		for _, e := range []*llmrelay.Error{unary, streamed} {
			t.Logf("%s: %v", c.name, e)
			if c.hint != "" && !strings.HasSuffix(e.Message, c.hint) {
				t.Errorf("%s: message %q; want it to end %q", c.name, e.Message, c.hint)
			}
			if c.hint == "" && (!strings.Contains(e.Message, c.said) || strings.Contains(e.Message, "client certificate")) {
				t.Errorf("%s: message %q; want grpc-go's %q, and no hint of client certificates", c.name, e.Message,
					c.said)
			}
		}
	}

	// And with its client CA's certificate, the gateway answers.
	config := tlsConfig(mutual.ClientCertFile, mutual.ClientKeyFile)
	if _, err := dial(t, mutual.Target, llmrelay.WithTLS(config)).Health(ctx, false); err != nil {
		t.Errorf("with a certificate of its client CA's: %v", err)
	}
}

func TestAgentEndsWithTheContextErrorDuringAModelCall(t *testing.T) {
	for _, streaming := range []bool{false, true} {
		t.Run(fmt.Sprintf("streaming=%t", streaming), func(t *testing.T) {
			client := setup(t)
			agent := &llmrelay.Agent{Client: client, Tools: agentTools(t)}
			if streaming {
				agent.OnChunk = func(*llmrelayv1.StreamCompleteResponse) {}
			}
			if err := env.Upstream.AddFaults(gatewaytest.Fault{"stall_s": 5}, gatewaytest.Fault{"stall_s": 5}); err != nil {
				t.Fatal(err)
			}
			cancelled, cancel := context.WithCancel(context.Background())
			time.AfterFunc(300*time.Millisecond, cancel)
			outOfTime, cancelTimeout := context.WithTimeout(context.Background(), time.Second)
			defer cancelTimeout()
			for _, c := range []struct {
				ctx  context.Context
				want error
				code codes.Code
			}{{cancelled, context.Canceled, codes.Canceled}, {outOfTime, context.DeadlineExceeded, codes.DeadlineExceeded}} {
				conversation := llmrelay.NewConversation(chat("slow")...)
				_, err := agent.Run(c.ctx, conversation)
				if !errors.Is(err, c.want) {
					t.Errorf("error %v; want one errors.Is finds %v in", err, c.want)
				}
				mustFail(t, err, c.code) // the model call's *Error, still there to read
				if len(conversation.Messages) != 2 {
					t.Errorf("the conversation holds %d messages; want the 2 it had", len(conversation.Messages))
				}
			}
		})
	}
}

func TestAgentCancelledWhileToolsRunAnswersEveryCall(t *testing.T) {
	client := setup(t)
	started, added := make(chan struct{}), make(chan struct{})
	wait := mustTool(t)(llmrelay.NewTool("wait", "Waits for its context to end",
		func(ctx context.Context, _ struct{}) (string, error) {
			close(started)
			<-ctx.Done()
			return "", ctx.Err()
		}))
	add := mustTool(t)(llmrelay.NewTool("add", "Adds two integers", func(_ context.Context, args sumArgs) (sum, error) {
		defer close(added)
		return sum{args.A + args.B}, nil
	}))
	if err := env.Upstream.AddFaults(
		gatewaytest.Fault{"tool_calls": []map[string]string{
			{"name": "add", "arguments": `{"a": 2, "b": 3}`},
			{"name": "wait", "arguments": "{}"},
		}},
		gatewaytest.Fault{"echo_tools": true},
	); err != nil {
		t.Fatal(err)
	}
	agent := &llmrelay.Agent{Client: client, Tools: []llmrelay.Tool{add, wait}}
	conversation := llmrelay.NewConversation(chat("add, then wait")...)
	ctx, cancel := context.WithCancel(testContext(t))
	go func() {
		<-started
		<-added
		// add has returned; its result is the run's once its goroutine has seen ctx still live, a moment later.
		time.Sleep(50 * time.Millisecond)
		cancel()
	}()
	result, err := agent.Run(ctx, conversation)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
	// The call that finished first keeps its result; the one still running when the run was cancelled is answered
	// so, not with its context's error, in the other SDKs' words.
	want := []string{`{"sum":5}`, "error: the run was cancelled before the tool finished"}
	if got := toolResults(conversation.Messages); !slices.Equal(got, want) {
		t.Fatalf("the conversation's tool results %q; want every call answered: %q", got, want)
	}
	if len(result.Messages) != 3 {
		t.Errorf("the run added %d messages; want the answer and its 2 results", len(result.Messages))
	}

	// Every call answered: the conversation goes on.
	result, err = agent.Run(testContext(t), conversation)
	if err != nil {
		t.Fatal(err)
	}
	if got := result.Answer.GetMessage().GetContent(); !strings.Contains(got, `add={"sum":5}`) {
		t.Errorf("the next run's answer %q; want it to have read the first run's results", got)
	}
}

// A run cancelled while its tools run waits for them as without a ToolTimeout, but no longer than it: a tool that
// ignores its context is answered at the timeout, as one that honours it is, that the run was cancelled.
func TestAgentCancelledWhileToolsRunWaitsNoLongerThanItsToolTimeout(t *testing.T) {
	client := setup(t)
	release := make(chan struct{})
	defer close(release)
	started := make(chan struct{})
	hang := mustTool(t)(llmrelay.NewTool("hang", "Ignores its context", func(context.Context, struct{}) (string, error) {
		close(started)
		select {
		case <-release:
		case <-time.After(10 * time.Second):
		}
		return "too late", nil
	}))
	wait := mustTool(t)(llmrelay.NewTool("wait", "Waits for its context to end",
		func(ctx context.Context, _ struct{}) (string, error) {
			<-ctx.Done()
			return "", ctx.Err()
		}))
	if err := env.Upstream.AddFaults(
		gatewaytest.Fault{"tool_calls": []map[string]string{
			{"name": "hang", "arguments": "{}"},
			{"name": "wait", "arguments": "{}"},
		}},
		gatewaytest.Fault{"echo_tools": true},
	); err != nil {
		t.Fatal(err)
	}
	agent := &llmrelay.Agent{Client: client, Tools: []llmrelay.Tool{hang, wait}, ToolTimeout: 1500 * time.Millisecond}
	conversation := llmrelay.NewConversation(chat("hang and wait")...)
	ctx, cancel := context.WithCancel(testContext(t))
	go func() {
		<-started
		cancel()
	}()
	began := time.Now()
	_, err := agent.Run(ctx, conversation)
	took := time.Since(began)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
	cancelled := "error: the run was cancelled before the tool finished"
	if got, want := toolResults(conversation.Messages), []string{cancelled, cancelled}; !slices.Equal(got, want) {
		t.Errorf("the conversation's tool results %q; want %q", got, want)
	}
	if took < time.Second || took > 5*time.Second {
		t.Errorf("the run took %s; want the hanging tool waited for until its timeout, 1.5s", took)
	}
}

// OnToolResult heard the results before they were added: one that panicked (a caller that recovers, as an HTTP
// server does per request) left the answer's calls unanswered, and the next run failed INVALID_ARGUMENT.
func TestAgentWhoseOnToolResultPanicsKeepsEveryCallAnswered(t *testing.T) {
	client := setup(t)
	if err := env.Upstream.AddFaults(
		gatewaytest.Fault{"tool_calls": []map[string]string{{"name": "add", "arguments": `{"a": 2, "b": 3}`}}},
		gatewaytest.Fault{"echo_tools": true},
	); err != nil {
		t.Fatal(err)
	}
	agent := &llmrelay.Agent{Client: client, Tools: agentTools(t),
		OnToolResult: func(*llmrelayv1.ToolCall, *llmrelayv1.Message) { panic("the display failed") }}
	conversation := llmrelay.NewConversation(chat("add")...)
	func() {
		defer func() {
			if recover() == nil {
				t.Fatal("OnToolResult's panic did not come through")
			}
		}()
		_, _ = agent.Run(testContext(t), conversation)
	}()
	if got, want := toolResults(conversation.Messages), []string{`{"sum":5}`}; !slices.Equal(got, want) {
		t.Fatalf("the conversation's tool results %q; want every call answered: %q", got, want)
	}
	agent.OnToolResult = nil
	if _, err := agent.Run(testContext(t), conversation); err != nil {
		t.Fatalf("the conversation does not go on: %v", err)
	}
}

// An agent with ExactModel asks for its model alone: a failure of its backend ends the run, where without it the
// gateway falls back to the next backend. Seen through the gateway with two backends, both at one upstream.
func TestAgentWithExactModelHasNoFallback(t *testing.T) {
	for _, streaming := range []bool{false, true} {
		t.Run(fmt.Sprintf("streaming=%t", streaming), func(t *testing.T) {
			client, gateway := setupFallback(t, llmrelay.WithServiceConfig("")) // no channel retries
			agent := &llmrelay.Agent{Client: client, Tools: agentTools(t), Model: "tiny"}
			if streaming {
				agent.OnChunk = func(*llmrelayv1.StreamCompleteResponse) {}
			}
			unavailable := gatewaytest.Fault{"status": 503}

			// Without it the fallback answers: the failure below is ExactModel's doing.
			if err := gateway.Upstream.AddFaults(unavailable); err != nil {
				t.Fatal(err)
			}
			result, err := agent.Run(testContext(t), llmrelay.NewConversation(chat("anyone?")...))
			if err != nil {
				t.Fatalf("%v\ngateway log:\n%s", err, gateway.Log())
			}
			if result.Answer.GetBackend() != gateway.FallbackBackend {
				t.Fatalf("answered by %q; want the fallback, %q", result.Answer.GetBackend(), gateway.FallbackBackend)
			}

			agent.ExactModel = true
			if err := gateway.Upstream.AddFaults(unavailable, unavailable); err != nil {
				t.Fatal(err)
			}
			before, err := gateway.Upstream.Requests()
			if err != nil {
				t.Fatal(err)
			}
			conversation := llmrelay.NewConversation(chat("anyone?")...)
			result, err = agent.Run(testContext(t), conversation)
			e := mustFail(t, err, codes.Unavailable)
			after, err := gateway.Upstream.Requests()
			if err != nil {
				t.Fatal(err)
			}
			if len(after)-len(before) != 1 {
				t.Errorf("the upstream got %d requests; want the one to the model's backend, no fallback",
					len(after)-len(before))
			}
			for _, attempt := range e.Attempts {
				if attempt.GetBackend() != "ollama" {
					t.Errorf("attempts %v; want ollama's alone", e.Attempts)
				}
			}
			if result.Steps != 0 || len(conversation.Messages) != 2 {
				t.Errorf("%d steps, %d messages; want the run ended at its first call", result.Steps,
					len(conversation.Messages))
			}
			if err := gateway.Upstream.ClearFaults(); err != nil { // the second fault, untaken
				t.Fatal(err)
			}
		})
	}
}

// A step's tools are bounded by ToolTimeout: a call still running then is answered that it did not finish, in the
// Python SDK's words, and the run goes on; a tool that honours its context stops, one that ignores it runs on, and
// what it returns later is dropped.
func TestAgentToolTimeoutAnswersAToolStillRunning(t *testing.T) {
	client := setup(t)
	release, returned := make(chan struct{}), make(chan struct{})
	hang := mustTool(t)(llmrelay.NewTool("hang", "Ignores its context", func(context.Context, struct{}) (string, error) {
		defer close(returned)
		select {
		case <-release:
		case <-time.After(10 * time.Second): // without the bound the run gets this result, and fails, not hangs
		}
		return "too late", nil
	}))
	var waitErr, waitCause error
	stopped := make(chan struct{})
	wait := mustTool(t)(llmrelay.NewTool("wait", "Waits for its context to end",
		func(ctx context.Context, _ struct{}) (string, error) {
			defer close(stopped)
			select {
			case <-ctx.Done():
			case <-time.After(10 * time.Second): // as hang's
			}
			waitErr, waitCause = ctx.Err(), context.Cause(ctx)
			return "", ctx.Err()
		}))
	add := mustTool(t)(llmrelay.NewTool("add", "Adds two integers", func(_ context.Context, args sumArgs) (sum, error) {
		return sum{args.A + args.B}, nil
	}))
	if err := env.Upstream.AddFaults(
		gatewaytest.Fault{"tool_calls": []map[string]string{
			{"name": "add", "arguments": `{"a": 2, "b": 3}`},
			{"name": "hang", "arguments": "{}"},
			{"name": "wait", "arguments": "{}"},
		}},
		gatewaytest.Fault{"echo_tools": true},
	); err != nil {
		t.Fatal(err)
	}
	agent := &llmrelay.Agent{Client: client, Tools: []llmrelay.Tool{add, hang, wait},
		ToolTimeout: 500 * time.Millisecond}
	conversation := llmrelay.NewConversation(chat("add, hang and wait")...)
	began := time.Now()
	result, err := agent.Run(testContext(t), conversation)
	took := time.Since(began)
	defer close(release)
	if err != nil {
		t.Fatalf("%v\ngateway log:\n%s", err, env.Log())
	}
	unfinished := "error: the tool did not finish within 0.5 s"
	want := []string{`{"sum":5}`, unfinished, unfinished}
	if got := toolResults(conversation.Messages); !slices.Equal(got, want) {
		t.Fatalf("the conversation's tool results %q; want %q", got, want)
	}
	if result.Steps != 2 || !strings.Contains(result.Answer.GetMessage().GetContent(), "hang="+unfinished) {
		t.Errorf("%d steps, final answer %q; want the run gone on to read the results", result.Steps,
			result.Answer.GetMessage().GetContent())
	}
	if took > 5*time.Second {
		t.Errorf("the run took %s; want the hanging tool given up after 0.5s", took)
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("the tool that honours its context did not see it end")
	}
	if !errors.Is(waitErr, context.DeadlineExceeded) ||
		!strings.Contains(fmt.Sprint(waitCause), "did not finish within 0.5 s") {
		t.Errorf("the tool's context ended with %v (cause %v); want its deadline, the tool timeout", waitErr, waitCause)
	}

	// The hanging tool returns now: its result goes nowhere.
	messages := slices.Clone(conversation.Messages)
	release <- struct{}{}
	<-returned
	time.Sleep(50 * time.Millisecond)
	if !slices.Equal(conversation.Messages, messages) || !slices.Equal(toolResults(conversation.Messages), want) {
		t.Errorf("the conversation changed after the late tool returned: %v", conversation.Messages)
	}
}

// toolResults are the contents of the tool messages that answer the calls of the conversation's last assistant
// message with calls, in the calls' order ("<unanswered>" for a call without one).
func toolResults(messages []*llmrelayv1.Message) []string {
	for i := len(messages) - 1; i >= 0; i-- {
		calls := messages[i].GetToolCalls()
		if len(calls) == 0 {
			continue
		}
		var contents []string
		for _, call := range calls {
			content := "<unanswered>"
			for _, message := range messages[i+1:] {
				if message.GetToolCallId() == call.GetId() {
					content = message.GetContent()
				}
			}
			contents = append(contents, content)
		}
		return contents
	}
	return nil
}

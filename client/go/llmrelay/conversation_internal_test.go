package llmrelay

// Unit tests of the pure pieces of the agent helpers: which messages make the oldest turn, a budget below 0 refused,
// and usage summed over steps. No server.

import (
	"context"
	"maps"
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"

	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

func TestOldestTurn(t *testing.T) {
	toolCall := &llmrelayv1.Message{Role: llmrelayv1.Role_ROLE_ASSISTANT,
		ToolCalls: []*llmrelayv1.ToolCall{{Id: "call_1", Function: &llmrelayv1.FunctionCall{Name: "f"}}}}
	cases := []struct {
		name     string
		messages []*llmrelayv1.Message
		want     []int // nil: nothing may be dropped
	}{
		{"empty", nil, nil},
		{"one turn", []*llmrelayv1.Message{System("s"), User("u"), Assistant("a")}, nil},
		{"one turn with tools", []*llmrelayv1.Message{User("u"), toolCall, ToolResult(toolCall.GetToolCalls()[0], "r"), Assistant("a")}, nil},
		{"two turns", []*llmrelayv1.Message{System("s"), User("u1"), Assistant("a1"), User("u2")}, []int{1, 2}},
		{
			"the tool calls go with their results",
			[]*llmrelayv1.Message{System("s"), User("u1"), toolCall, ToolResult(toolCall.GetToolCalls()[0], "r"), Assistant("a1"),
				User("u2"), Assistant("a2")},
			[]int{1, 2, 3, 4},
		},
		{
			"a system message inside stays",
			[]*llmrelayv1.Message{User("u1"), System("s"), Assistant("a1"), User("u2")},
			[]int{0, 2},
		},
		{"an answer before the first user message", []*llmrelayv1.Message{System("s"), Assistant("hi"), User("u")}, []int{1}},
	}
	for _, c := range cases {
		turn := oldestTurn(c.messages)
		got := slices.Sorted(maps.Keys(turn))
		if (turn == nil) != (c.want == nil) || !slices.Equal(got, c.want) {
			t.Errorf("%s: oldest turn %v, want %v", c.name, got, c.want)
		}
	}
}

func TestConversationRefusesABudgetBelowZero(t *testing.T) {
	// A context window less the answer's room gone below 0 was taken as no budget: nothing dropped, no error.
	// No client: each must fail before it counts.
	const want = "llmrelay: Conversation.TokenBudget must be 0 or more, not -1000"
	fits := []struct {
		name string
		fit  func(*Conversation) error
	}{
		{"Fit", func(c *Conversation) error { _, err := c.Fit(context.Background(), nil); return err }},
		{"FitFor", func(c *Conversation) error {
			_, err := c.FitFor(context.Background(), nil, &llmrelayv1.CompletionOptions{})
			return err
		}},
		{"Run", func(c *Conversation) error { _, err := (&Agent{}).Run(context.Background(), c); return err }},
	}
	for _, f := range fits {
		conversation := NewConversation(User("old"), Assistant("answer"), User("new"))
		conversation.TokenBudget = 4000 - 5000
		if err := f.fit(conversation); err == nil || err.Error() != want {
			t.Fatalf("%s: err = %v, want %q", f.name, err, want)
		}
		if len(conversation.Messages) != 3 {
			t.Errorf("%s: %d messages left, want the 3 kept", f.name, len(conversation.Messages))
		}
	}
	// 0 is no budget, as the field says: nothing to count, so no client needed.
	if dropped, err := NewConversation(User("hi")).Fit(context.Background(), nil); dropped != 0 || err != nil {
		t.Errorf("Fit without a budget: dropped %d, err %v; want nothing done", dropped, err)
	}
}

func TestSumUsage(t *testing.T) {
	first := &llmrelayv1.Usage{PromptTokens: 10, CompletionTokens: 5, TotalTokens: 15, ReasoningTokens: proto.Int32(2)}
	second := &llmrelayv1.Usage{PromptTokens: 20, CompletionTokens: 1, TotalTokens: 21, Estimated: true,
		CacheWritePromptTokens: proto.Int32(4), Cost: &llmrelayv1.Cost{UsdMicros: 7, Estimated: true}}
	total := sumUsage(sumUsage(nil, first), second)
	want := &llmrelayv1.Usage{PromptTokens: 30, CompletionTokens: 6, TotalTokens: 36, Estimated: true,
		ReasoningTokens: proto.Int32(2), CacheWritePromptTokens: proto.Int32(4),
		Cost: &llmrelayv1.Cost{UsdMicros: 7, Estimated: true}}
	if !proto.Equal(total, want) {
		t.Errorf("sum %v, want %v", total, want)
	}
	if first.GetPromptTokens() != 10 || first.GetCost() != nil {
		t.Errorf("the first step's usage was changed: %v", first)
	}
	if sumUsage(nil, nil) != nil || !proto.Equal(sumUsage(first, nil), first) {
		t.Error("a step without usage changed the sum")
	}
}

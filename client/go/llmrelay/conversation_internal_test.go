package llmrelay

// Unit tests of the pure pieces of the agent helpers: which messages make the oldest turn, and usage summed over
// steps. No server.

import (
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

func TestSumUsage(t *testing.T) {
	first := &llmrelayv1.Usage{PromptTokens: 10, CompletionTokens: 5, TotalTokens: 15, ReasoningTokens: proto.Int32(2)}
	second := &llmrelayv1.Usage{PromptTokens: 20, CompletionTokens: 1, TotalTokens: 21, Estimated: true,
		Cost: &llmrelayv1.Cost{UsdMicros: 7, Estimated: true}}
	total := sumUsage(sumUsage(nil, first), second)
	want := &llmrelayv1.Usage{PromptTokens: 30, CompletionTokens: 6, TotalTokens: 36, Estimated: true,
		ReasoningTokens: proto.Int32(2), Cost: &llmrelayv1.Cost{UsdMicros: 7, Estimated: true}}
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

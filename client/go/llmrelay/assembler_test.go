package llmrelay_test

// Unit tests of the Assembler: no server.

import (
	"testing"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"

	"github.com/llmrelay/llmrelay/client/go/llmrelay"
	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

// deltaChunk is a message of the stream from backend carrying delta.
func deltaChunk(backend string, delta *llmrelayv1.MessageDelta) *llmrelayv1.StreamCompleteResponse {
	return &llmrelayv1.StreamCompleteResponse{Id: "id-" + backend, Backend: backend, Model: "m-" + backend, Delta: delta}
}

func content(text string) *llmrelayv1.MessageDelta {
	return &llmrelayv1.MessageDelta{Content: proto.String(text)}
}

func toolFragment(index int32, id, name, arguments string) *llmrelayv1.MessageDelta {
	fragment := &llmrelayv1.ToolCallDelta{Index: index}
	if id != "" {
		fragment.Id = proto.String(id)
	}
	if name != "" {
		fragment.Name = proto.String(name)
	}
	if arguments != "" {
		fragment.Arguments = proto.String(arguments)
	}
	return &llmrelayv1.MessageDelta{ToolCalls: []*llmrelayv1.ToolCallDelta{fragment}}
}

func lastChunk(backend string, outcomes ...llmrelayv1.AttemptOutcome) *llmrelayv1.StreamCompleteResponse {
	chunk := deltaChunk(backend, &llmrelayv1.MessageDelta{})
	chunk.FinishReason = llmrelayv1.FinishReason_FINISH_REASON_TOOL_CALLS
	chunk.Usage = &llmrelayv1.Usage{PromptTokens: 10, CompletionTokens: 5, TotalTokens: 15}
	for _, outcome := range outcomes {
		chunk.Attempts = append(chunk.Attempts, &llmrelayv1.Attempt{Backend: backend, Outcome: outcome})
	}
	return chunk
}

// answerChunks is a whole answer from backend: content and reasoning in pieces, and two tool calls whose fragments
// interleave (the second one's first).
func answerChunks(backend string) []*llmrelayv1.StreamCompleteResponse {
	signed := toolFragment(0, "call_a", "f", "")
	signed.ToolCalls[0].Signature = proto.String("sig_a")
	return []*llmrelayv1.StreamCompleteResponse{
		deltaChunk(backend, &llmrelayv1.MessageDelta{Reasoning: proto.String("Think")}),
		deltaChunk(backend, &llmrelayv1.MessageDelta{Reasoning: proto.String("ing.")}),
		deltaChunk(backend, content("Hel")),
		deltaChunk(backend, content("lo")),
		deltaChunk(backend, toolFragment(1, "call_b", "g", `{"y"`)),
		deltaChunk(backend, signed),
		deltaChunk(backend, toolFragment(0, "", "", `{"x":`)),
		deltaChunk(backend, toolFragment(1, "", "", `:2}`)),
		deltaChunk(backend, toolFragment(0, "", "", `1}`)),
		lastChunk(backend, llmrelayv1.AttemptOutcome_ATTEMPT_OUTCOME_SUCCEEDED),
	}
}

func wantAnswer(backend string, outcomes ...llmrelayv1.AttemptOutcome) *llmrelayv1.CompleteResponse {
	last := lastChunk(backend, outcomes...)
	return &llmrelayv1.CompleteResponse{
		Id:      "id-" + backend,
		Backend: backend,
		Model:   "m-" + backend,
		Message: &llmrelayv1.Message{
			Role:      llmrelayv1.Role_ROLE_ASSISTANT,
			Content:   "Hello",
			Reasoning: proto.String("Thinking."),
			ToolCalls: []*llmrelayv1.ToolCall{
				{Id: "call_a", Function: &llmrelayv1.FunctionCall{Name: "f", Arguments: `{"x":1}`}, Signature: proto.String("sig_a")},
				{Id: "call_b", Function: &llmrelayv1.FunctionCall{Name: "g", Arguments: `{"y":2}`}},
			},
		},
		FinishReason: llmrelayv1.FinishReason_FINISH_REASON_TOOL_CALLS,
		Usage:        last.GetUsage(),
		Attempts:     last.GetAttempts(),
	}
}

func assertAnswer(t *testing.T, got, want *llmrelayv1.CompleteResponse) {
	t.Helper()
	if !proto.Equal(got, want) {
		t.Errorf("assembled:\n%s\nwant:\n%s", prototext.Format(got), prototext.Format(want))
	}
}

func TestAssemblerFoldsDeltas(t *testing.T) {
	var answer llmrelay.Assembler
	for _, chunk := range answerChunks("b1") {
		answer.Add(chunk)
	}
	assertAnswer(t, answer.Result(), wantAnswer("b1", llmrelayv1.AttemptOutcome_ATTEMPT_OUTCOME_SUCCEEDED))
	if answer.Restarts() != 0 {
		t.Errorf("%d restarts, want 0", answer.Restarts())
	}
}

func TestAssemblerRestartDiscardsEverythingBefore(t *testing.T) {
	var answer llmrelay.Assembler
	broken := answerChunks("b1")
	for _, chunk := range broken[:len(broken)-2] { // the broken stream: no last fragment, no last message
		answer.Add(chunk)
	}
	interrupted := llmrelayv1.AttemptOutcome_ATTEMPT_OUTCOME_INTERRUPTED
	answer.Add(&llmrelayv1.StreamCompleteResponse{Restart: &llmrelayv1.StreamRestart{
		Reason:   "the stream ended without [DONE]",
		Backend:  "b1",
		Attempts: []*llmrelayv1.Attempt{{Backend: "b1", Outcome: interrupted}},
		Usage:    &llmrelayv1.Usage{PromptTokens: 10, CompletionTokens: 2, TotalTokens: 12, Estimated: true},
	}})
	if got := answer.Result(); got.GetMessage().GetContent() != "" || len(got.GetMessage().GetToolCalls()) != 0 ||
		got.GetBackend() != "" || got.GetMessage().Reasoning != nil {
		t.Errorf("right after the restart marker: %v; want an empty answer", got)
	}
	fresh := answerChunks("b2")
	fresh[len(fresh)-1] = lastChunk("b2", interrupted, llmrelayv1.AttemptOutcome_ATTEMPT_OUTCOME_SUCCEEDED)
	for _, chunk := range fresh {
		answer.Add(chunk)
	}
	assertAnswer(t, answer.Result(), wantAnswer("b2", interrupted, llmrelayv1.AttemptOutcome_ATTEMPT_OUTCOME_SUCCEEDED))
	if answer.Restarts() != 1 {
		t.Errorf("%d restarts, want 1", answer.Restarts())
	}
}

func TestAssemblerWithoutReasoningLeavesItUnset(t *testing.T) {
	var answer llmrelay.Assembler
	answer.Add(deltaChunk("b1", content("Hi")))
	answer.Add(deltaChunk("b1", nil))
	got := answer.Result()
	if got.GetMessage().GetContent() != "Hi" || got.GetMessage().Reasoning != nil || got.GetMessage().GetToolCalls() != nil {
		t.Errorf("assembled %v; want content Hi, no reasoning, no tool calls", got)
	}
}

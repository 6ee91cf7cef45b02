package llmrelay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

// Collect streams one completion and returns the whole answer, assembled as Complete would return it, while onChunk
// (may be nil) sees every message of the stream as it arrives, for printing the tokens as they come.
//
// Unless req sets OnInterrupt itself, Collect asks for INTERRUPT_POLICY_RESTART (req is not modified): when an
// upstream's stream breaks after it started and time remains, the gateway sends a restart marker and answers again
// from the next backend. Collect then discards what it had assembled, and onChunk gets the marker
// (chunk.GetRestart() != nil): whatever it printed so far is void, the answer starts over with the next message.
//
// The answer's usage and attempts are those of the stream's last message: every attempt, the broken ones included.
// A failed call returns an *Error; a stream that breaks with no backend or time left for a restart fails with
// ABORTED (reason STREAM_INTERRUPTED).
func (c *Client) Collect(ctx context.Context, req *llmrelayv1.StreamCompleteRequest, onChunk func(*llmrelayv1.StreamCompleteResponse), opts ...grpc.CallOption) (*llmrelayv1.CompleteResponse, error) {
	if req.GetOnInterrupt() == llmrelayv1.InterruptPolicy_INTERRUPT_POLICY_UNSPECIFIED {
		if req == nil {
			req = &llmrelayv1.StreamCompleteRequest{} // the gateway says what is missing
		}
		req = proto.CloneOf(req)
		req.OnInterrupt = llmrelayv1.InterruptPolicy_INTERRUPT_POLICY_RESTART
	}
	stream, err := c.Stream(ctx, req, opts...)
	if err != nil {
		return nil, err
	}
	defer stream.Close()
	var answer Assembler
	for {
		chunk, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return answer.Result(), nil
		}
		if err != nil {
			return nil, err
		}
		answer.Add(chunk)
		if onChunk != nil {
			onChunk(chunk)
		}
	}
}

// PrintTo is an onChunk for Collect (and Agent.OnChunk) that writes the answer's content to w as it comes, and at a
// restart marker a line that says the answer starts over (what was written before it is void).
func PrintTo(w io.Writer) func(*llmrelayv1.StreamCompleteResponse) {
	return func(chunk *llmrelayv1.StreamCompleteResponse) {
		if restart := chunk.GetRestart(); restart != nil {
			fmt.Fprintf(w, "\n[%s broke off (%s); starting over]\n", restart.GetBackend(), restart.GetReason())
			return
		}
		_, _ = io.WriteString(w, chunk.GetDelta().GetContent())
	}
}

// Assembler folds the messages of a stream into the answer Complete would return, without a server: Add each
// message in order, then read Result. A restart marker (a message whose Restart is set) discards everything added
// before it. The zero value is ready to use; do not copy an Assembler after its first Add.
//
//	var answer llmrelay.Assembler
//	for { chunk, err := stream.Recv(); ...; answer.Add(chunk) }
//	resp := answer.Result()
type Assembler struct {
	id, backend, model string
	content, reasoning strings.Builder
	hasReasoning       bool
	signature          *string
	toolCalls          map[int32]*llmrelayv1.ToolCall
	finishReason       llmrelayv1.FinishReason
	usage              *llmrelayv1.Usage
	attempts           []*llmrelayv1.Attempt
	restarts           int
}

// Add folds one message of the stream into the answer: its deltas are appended (tool call fragments joined by their
// index: the id, name and signature from the first fragment that has them, the arguments concatenated), its id, backend, model,
// finish reason, usage and attempts kept when set. A restart marker resets the answer instead.
func (a *Assembler) Add(chunk *llmrelayv1.StreamCompleteResponse) {
	if chunk.GetRestart() != nil {
		restarts := a.restarts + 1
		*a = Assembler{restarts: restarts}
		return
	}
	if chunk.GetId() != "" {
		a.id = chunk.GetId()
	}
	if chunk.GetBackend() != "" {
		a.backend = chunk.GetBackend()
	}
	if chunk.GetModel() != "" {
		a.model = chunk.GetModel()
	}
	delta := chunk.GetDelta()
	a.content.WriteString(delta.GetContent())
	if delta != nil && delta.Reasoning != nil {
		a.hasReasoning = true
		a.reasoning.WriteString(delta.GetReasoning())
	}
	if delta != nil && delta.ReasoningSignature != nil {
		a.signature = proto.String(delta.GetReasoningSignature())
	}
	for _, fragment := range delta.GetToolCalls() {
		if a.toolCalls == nil {
			a.toolCalls = map[int32]*llmrelayv1.ToolCall{}
		}
		call := a.toolCalls[fragment.GetIndex()]
		if call == nil {
			call = &llmrelayv1.ToolCall{Function: &llmrelayv1.FunctionCall{}}
			a.toolCalls[fragment.GetIndex()] = call
		}
		if call.Id == "" {
			call.Id = fragment.GetId()
		}
		if call.Function.Name == "" {
			call.Function.Name = fragment.GetName()
		}
		call.Function.Arguments += fragment.GetArguments()
		if call.Signature == nil && fragment.Signature != nil {
			call.Signature = proto.String(fragment.GetSignature())
		}
	}
	if chunk.GetFinishReason() != llmrelayv1.FinishReason_FINISH_REASON_UNSPECIFIED {
		a.finishReason = chunk.GetFinishReason()
	}
	if chunk.GetUsage() != nil {
		a.usage = chunk.GetUsage()
	}
	if len(chunk.GetAttempts()) > 0 {
		a.attempts = chunk.GetAttempts()
	}
}

// Restarts is how many restart markers were added: how often the answer started over.
func (a *Assembler) Restarts() int {
	return a.restarts
}

// Result is the answer assembled so far: an assistant message with the content, the reasoning (set when a delta
// had any) and the tool calls in index order, and the id, backend, model, finish reason, usage and attempts of the
// stream. Usage and attempts are the stream's last message's; the stream's answer is complete once that arrived.
func (a *Assembler) Result() *llmrelayv1.CompleteResponse {
	message := &llmrelayv1.Message{Role: llmrelayv1.Role_ROLE_ASSISTANT, Content: a.content.String()}
	if a.hasReasoning {
		message.Reasoning = proto.String(a.reasoning.String())
	}
	message.ReasoningSignature = a.signature
	for _, index := range slices.Sorted(maps.Keys(a.toolCalls)) {
		message.ToolCalls = append(message.ToolCalls, proto.CloneOf(a.toolCalls[index]))
	}
	return &llmrelayv1.CompleteResponse{
		Id:           a.id,
		Backend:      a.backend,
		Model:        a.model,
		Message:      message,
		FinishReason: a.finishReason,
		Usage:        a.usage,
		Attempts:     a.attempts,
	}
}

package llmrelay

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

// DefaultMaxSteps bounds the model calls of an Agent's run when Agent.MaxSteps is 0.
const DefaultMaxSteps = 10

// Agent runs the tool loop: it asks the model for an answer with its tools on offer, runs the tool calls the answer
// asks for (all at once, RunToolCalls), appends the answer and the results to the conversation, and asks again,
// until an answer calls no tool or MaxSteps model calls were made. Set the fields, then Run; an Agent may run
// several conversations at once.
//
//	agent := &llmrelay.Agent{Client: client, Tools: []llmrelay.Tool{weather, clock}}
//	conversation := llmrelay.NewConversation(llmrelay.User("What's the weather in Paris?"))
//	result, err := agent.Run(ctx, conversation)
//	fmt.Println(result.Answer.GetMessage().GetContent())
type Agent struct {
	// Client calls the gateway.
	Client *Client
	// Tools are the functions the model may call; their definitions are added to Options.Tools.
	Tools []Tool
	// Model is the model each request names ("" for the gateway's default chain).
	Model string
	// ExactModel sets each request's ExactModel: only Model (the default chain's first model, when it is "") may
	// answer, the gateway falling back to no other backend's model, for a run whose tools or prompts are written for
	// that model alone.
	ExactModel bool
	// Options are each request's options (temperature, max tokens, tool choice, ...); not modified.
	Options *llmrelayv1.CompletionOptions
	// MaxSteps bounds the model calls of a run (0 or less: DefaultMaxSteps).
	MaxSteps int
	// OnChunk, when set, makes each step a stream read by Collect, and sees every message of it as it comes (to
	// print the answer as it is written); without it each step is one Complete.
	OnChunk func(*llmrelayv1.StreamCompleteResponse)
	// ToolTimeout, when above 0, bounds each step's tools, so that one that hangs does not hold the run: each tool's
	// context ends that long after the step's tools started (a tool that honours it stops), and a call still running
	// then is answered "error: the tool did not finish within 0.5 s" (the seconds as Python's %g writes them), as in
	// the other SDKs, for the model to read, and the run goes on. Go cannot stop a goroutine: a tool that ignores its
	// context runs on by itself, and what it returns is dropped. 0 is no bound; Run refuses one below 0.
	ToolTimeout time.Duration
	// OnToolResult, when set, sees each tool call with its result once the step's calls have all returned (or were
	// answered at ToolTimeout) and their results are in the conversation, in the order of the calls (to show what
	// the agent does).
	OnToolResult func(call *llmrelayv1.ToolCall, result *llmrelayv1.Message)
}

// RunResult is what a run did.
type RunResult struct {
	// Answer is the last model call's answer: the final one, unless the run stopped at the step limit.
	Answer *llmrelayv1.CompleteResponse
	// Messages are the messages the run appended to the conversation, in order: each answer, each tool result.
	Messages []*llmrelayv1.Message
	// Steps is how many model calls the run made.
	Steps int
	// Usage is the usage of every model call of the run, summed.
	Usage *llmrelayv1.Usage
	// Attempts are every model call's attempts, in order.
	Attempts []*llmrelayv1.Attempt
}

// StepLimitError is a run that made MaxSteps model calls and the last answer still called tools. The conversation
// ends with those tools' results, so running it again goes on where this run stopped.
type StepLimitError struct {
	// MaxSteps is the limit the run reached.
	MaxSteps int
	// Result is what the run did, its last answer the one that called tools.
	Result *RunResult
}

func (e *StepLimitError) Error() string {
	return fmt.Sprintf("llmrelay: the model still called tools after %d steps, the agent's limit (Agent.MaxSteps): "+
		"run the conversation again to go on, or raise the limit", e.MaxSteps)
}

// Run runs the tool loop on the conversation, appending to it as it goes, and returns what it did; it refuses, before
// any call, Tools of which two share a name and a ToolTimeout below 0. Each step first fits
// the conversation to its token budget (Conversation.Fit, when it has one), counted for the conversation's Model or,
// when it names none, the agent's, with the answer format of the agent's Options. A model call that fails ends the run
// with its *Error (the conversation keeps the steps before); a run that reaches the step limit returns a
// *StepLimitError. A cancelled ctx ends the run with its error (errors.Is(err, context.Canceled), or
// context.DeadlineExceeded): during a model call, that call's *Error, which wraps it; during the tools, ctx.Err()
// itself, once they have returned (their context ends with ctx, so they can stop early) and their results are
// appended, so every tool call in the conversation has its result and the conversation can go on (a tool that
// returned after ctx ended: "error: the run was cancelled before the tool finished"; with a ToolTimeout, a tool that
// ignores ctx is waited for until the timeout at most, and then answered so too).
func (a *Agent) Run(ctx context.Context, conversation *Conversation) (*RunResult, error) {
	maxSteps := a.MaxSteps
	if maxSteps <= 0 {
		maxSteps = DefaultMaxSteps
	}
	options := &llmrelayv1.CompletionOptions{}
	if a.Options != nil {
		options = proto.CloneOf(a.Options)
	}
	if a.ToolTimeout < 0 {
		// Said before any call: a step's tools could not run, each answered at once that it did not finish.
		return &RunResult{}, fmt.Errorf("llmrelay: Agent.ToolTimeout is %v; it must be above 0, or 0 for no bound",
			a.ToolTimeout)
	}
	named := make(map[string]bool, len(a.Tools))
	for _, tool := range a.Tools {
		// Said before any call: the gateway refuses such a request (INVALID_ARGUMENT), and a tool call could not
		// tell the two apart.
		if named[tool.Name()] {
			return &RunResult{}, fmt.Errorf("llmrelay: two of Agent.Tools are named %q; each tool needs a name of its own", tool.Name())
		}
		named[tool.Name()] = true
		options.Tools = append(options.Tools, tool.Definition())
	}
	result := &RunResult{}
	for result.Steps < maxSteps {
		// Counted for the model the run asks when the conversation names none: another's tokenizer (the default
		// chain's) could count the chat under its budget where the model's would not.
		if _, err := conversation.fit(ctx, a.Client, a.Model, options.GetTools(), options.GetResponseFormat()); err != nil {
			return result, err
		}
		answer, err := a.ask(ctx, conversation.Messages, options)
		if err != nil {
			return result, err
		}
		result.Steps++
		result.Answer = answer
		result.Usage = sumUsage(result.Usage, answer.GetUsage())
		result.Attempts = append(result.Attempts, answer.GetAttempts()...)
		conversation.Add(answer.GetMessage())
		result.Messages = append(result.Messages, answer.GetMessage())
		calls := answer.GetMessage().GetToolCalls()
		if len(calls) == 0 {
			return result, nil
		}
		toolResults := runToolCalls(ctx, a.Tools, calls, a.ToolTimeout)
		// Appended even when ctx ended the run meanwhile, and before OnToolResult hears them (should it panic, the
		// caller that recovers keeps a conversation that goes on): an answer whose calls had no results would leave a
		// conversation that no model call takes.
		conversation.Add(toolResults...)
		result.Messages = append(result.Messages, toolResults...)
		for i, call := range calls {
			if a.OnToolResult != nil {
				a.OnToolResult(call, toolResults[i])
			}
		}
		if err := ctx.Err(); err != nil {
			return result, err
		}
	}
	return result, &StepLimitError{MaxSteps: maxSteps, Result: result}
}

// ask makes one model call: a Complete, or a Collect that shows the stream to OnChunk.
func (a *Agent) ask(ctx context.Context, messages []*llmrelayv1.Message, options *llmrelayv1.CompletionOptions) (*llmrelayv1.CompleteResponse, error) {
	var model *string
	if a.Model != "" {
		model = &a.Model
	}
	if a.OnChunk == nil {
		return a.Client.Complete(ctx, &llmrelayv1.CompleteRequest{Model: model, Messages: messages, Options: options,
			ExactModel: a.ExactModel})
	}
	return a.Client.Collect(ctx, &llmrelayv1.StreamCompleteRequest{Model: model, Messages: messages, Options: options,
		ExactModel: a.ExactModel}, a.OnChunk)
}

// sumUsage is total with usage added: every count summed, estimated when either was, the cost summed too.
func sumUsage(total, usage *llmrelayv1.Usage) *llmrelayv1.Usage {
	if usage == nil {
		return total
	}
	if total == nil {
		return proto.CloneOf(usage)
	}
	sum := &llmrelayv1.Usage{
		PromptTokens:           total.GetPromptTokens() + usage.GetPromptTokens(),
		CompletionTokens:       total.GetCompletionTokens() + usage.GetCompletionTokens(),
		TotalTokens:            total.GetTotalTokens() + usage.GetTotalTokens(),
		Estimated:              total.GetEstimated() || usage.GetEstimated(),
		ReasoningTokens:        sumOptional(total.ReasoningTokens, usage.ReasoningTokens),
		CachedPromptTokens:     sumOptional(total.CachedPromptTokens, usage.CachedPromptTokens),
		CacheWritePromptTokens: sumOptional(total.CacheWritePromptTokens, usage.CacheWritePromptTokens),
	}
	if total.GetCost() != nil || usage.GetCost() != nil {
		sum.Cost = &llmrelayv1.Cost{
			UsdMicros:    total.GetCost().GetUsdMicros() + usage.GetCost().GetUsdMicros(),
			Estimated:    total.GetCost().GetEstimated() || usage.GetCost().GetEstimated(),
			PriceUnknown: total.GetCost().GetPriceUnknown() || usage.GetCost().GetPriceUnknown(),
		}
	}
	return sum
}

// sumOptional sums two optional counts: unset when both are.
func sumOptional(a, b *int32) *int32 {
	if a == nil && b == nil {
		return nil
	}
	var sum int32
	for _, count := range []*int32{a, b} {
		if count != nil {
			sum += *count
		}
	}
	return &sum
}

package llmrelay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

// Tool is a function the model may call, with its definition for the request (FunctionTool's) and the handler that
// runs it. Make one with NewTool (its schema from a struct) or NewRawTool (its schema given).
type Tool struct {
	definition *llmrelayv1.Tool
	// handler runs the call with its arguments as the model wrote them, and returns the tool message's content.
	handler func(ctx context.Context, arguments json.RawMessage) (string, error)
}

// argumentsError is arguments a tool cannot take, which the model is told as such.
type argumentsError struct{ err error }

func (e argumentsError) Error() string { return e.err.Error() }

// NewTool makes a tool of a typed handler: the model's arguments are decoded into Args, a struct whose JSON Schema
// (SchemaOf) the model gets as the tool's parameters, and the handler's result becomes the tool message: a string as
// it is, anything else encoded by encoding/json. Arguments that are not JSON, lack a required property at any depth
// (null for one counts as missing, unless its field is a pointer or an interface), name an unknown one, give a value
// its enum tag does not list, or give a fixed-size array another number of items never reach the handler: the model gets a tool result that says what was
// wrong, as it does for an error the handler returns or a panic. NewTool fails where SchemaOf does (Args refers to
// itself, or a field's type encodes itself): give the schema explicitly with NewRawTool.
//
//	type Weather struct {
//		City string `json:"city" description:"The city, e.g. Paris"`
//	}
//	weather, err := llmrelay.NewTool("get_weather", "The weather now in a city",
//		func(ctx context.Context, args Weather) (string, error) { return "sunny in " + args.City, nil })
func NewTool[Args, Result any](name, description string, handler func(context.Context, Args) (Result, error)) (Tool, error) {
	t := reflect.TypeFor[Args]()
	parameters, shape, err := structSchemaFor(t)
	if err != nil {
		return Tool{}, fmt.Errorf("llmrelay: tool %q: the schema of %s: %w", name, t, err)
	}
	definition, err := FunctionTool(name, description, parameters)
	if err != nil {
		return Tool{}, err
	}
	run := func(ctx context.Context, arguments json.RawMessage) (string, error) {
		args, err := decodeArguments[Args](arguments, shape)
		if err != nil {
			return "", argumentsError{err}
		}
		result, err := handler(ctx, args)
		if err != nil {
			return "", err
		}
		return resultText(result)
	}
	return Tool{definition: definition, handler: run}, nil
}

// NewRawTool makes a tool of a handler that reads the arguments itself, as the JSON text the model wrote ("{}" when
// it wrote none), with parameters its JSON Schema as JSON text (nil for none); the handler's string is the tool
// message. An error or a panic becomes a tool result that says so.
func NewRawTool(name, description string, parameters json.RawMessage,
	handler func(ctx context.Context, arguments json.RawMessage) (string, error)) (Tool, error) {
	if parameters != nil && !json.Valid(parameters) {
		return Tool{}, fmt.Errorf("llmrelay: tool %q: the parameters are not JSON: %s", name, parameters)
	}
	var schema any
	if parameters != nil {
		schema = parameters
	}
	definition, err := FunctionTool(name, description, schema)
	if err != nil {
		return Tool{}, err
	}
	return Tool{definition: definition, handler: func(ctx context.Context, arguments json.RawMessage) (string, error) {
		if len(bytes.TrimSpace(arguments)) == 0 {
			arguments = json.RawMessage("{}")
		}
		if err := checkObject(arguments); err != nil {
			return "", argumentsError{err}
		}
		return handler(ctx, arguments)
	}}, nil
}

// Name is the tool's function name.
func (t Tool) Name() string {
	return t.definition.GetFunction().GetName()
}

// Definition is the tool as a request lists it (CompletionOptions.Tools).
func (t Tool) Definition() *llmrelayv1.Tool {
	return t.definition
}

// ToolResult is the tool message that answers the tool call with content. It names the call's id and, as the Python
// and TypeScript SDKs' results do, the function's name, which the gateway sends on to a format that carries it.
func ToolResult(call *llmrelayv1.ToolCall, content string) *llmrelayv1.Message {
	return &llmrelayv1.Message{Role: llmrelayv1.Role_ROLE_TOOL, Content: content,
		ToolCallId: proto.String(call.GetId()), Name: proto.String(call.GetFunction().GetName())}
}

// cancelledResult is the result of a call whose run was cancelled (ctx ended) before its tool returned, the other
// SDKs' words.
const cancelledResult = "error: the run was cancelled before the tool finished"

// RunToolCalls runs the tool calls of an assistant message, all at once, each in its own goroutine with ctx, and
// returns their tool messages in the order of the calls once all have returned. It never fails: a call of a tool not
// in tools, arguments the tool cannot take, and a handler that returns an error, panics or ends its goroutine
// (runtime.Goexit) each become a tool result that says so ("error: ..."), for the model to read and correct. A
// handler that returns once ctx has ended, whatever it returns, is answered "error: the run was cancelled before the
// tool finished", and so is a call whose ctx had ended before its tool started, which then does not start. In a result that is not valid UTF-8 (a Latin-1 file's bytes, say), each run of invalid bytes
// becomes U+FFFD: gRPC sends no other string, and a message it could not send would fail every later call of the
// conversation.
func RunToolCalls(ctx context.Context, tools []Tool, calls []*llmrelayv1.ToolCall) []*llmrelayv1.Message {
	return runToolCalls(ctx, tools, calls, 0)
}

// toolTimeoutError is the cause of the context of a call whose tool did not finish within its timeout (an Agent's
// ToolTimeout): the tool that honours its context stops, and its call is answered so rather than as cancelled.
type toolTimeoutError struct{ timeout time.Duration }

func (e *toolTimeoutError) Error() string {
	return fmt.Sprintf("llmrelay: the tool did not finish within %.6g s (Agent.ToolTimeout)", e.timeout.Seconds())
}

// unfinishedResult is the result of a call whose tool did not finish within timeout, in the other SDKs' words (the
// seconds as Python's "{:g}" writes them: six significant digits, "0.5").
func unfinishedResult(timeout time.Duration) string {
	return fmt.Sprintf("error: the tool did not finish within %.6g s", timeout.Seconds())
}

// endedResult is the result of a call whose context ended before its tool returned: that it did not finish within its
// timeout, where that ended it, else that the run was cancelled.
func endedResult(ctx context.Context) string {
	var late *toolTimeoutError
	if errors.As(context.Cause(ctx), &late) {
		return unfinishedResult(late.timeout)
	}
	return cancelledResult
}

// answered is the tool message of the call at index i of a step.
type answered struct {
	i      int
	result *llmrelayv1.Message
}

// runToolCalls is RunToolCalls, each tool's context ending timeout after the start (0: no bound). Once timeout has
// passed, the calls still running are answered that they did not finish (or, where ctx ended first, that the run was
// cancelled) and their goroutines are left to return by themselves: their results, sent on a channel with room for
// every call, are read by nobody, so the results returned are never written after.
func runToolCalls(ctx context.Context, tools []Tool, calls []*llmrelayv1.ToolCall,
	timeout time.Duration) []*llmrelayv1.Message {
	byName := make(map[string]Tool, len(tools))
	for _, tool := range tools {
		byName[tool.Name()] = tool
	}
	toolCtx := ctx
	var ended <-chan struct{} // toolCtx's end, watched with a timeout only: nil, never ready, without one
	var deadline time.Time
	if timeout > 0 {
		deadline = time.Now().Add(timeout)
		var cancel context.CancelFunc
		toolCtx, cancel = context.WithDeadlineCause(ctx, deadline, &toolTimeoutError{timeout})
		defer cancel()
		ended = toolCtx.Done()
	}
	done := make(chan answered, len(calls))
	for i, call := range calls {
		go func() {
			var result *llmrelayv1.Message
			// A handler that ends its goroutine without returning or panicking (runtime.Goexit, t.FailNow inside a
			// tool) skips the assignment below: its call gets a result all the same, since a call left unanswered
			// would fail every later model call of the conversation.
			defer func() {
				if result == nil { // %q writes valid UTF-8 whatever the name
					result = ToolResult(call,
						fmt.Sprintf("error: tool %q ended without a result", call.GetFunction().GetName()))
				}
				done <- answered{i, result}
			}()
			content := strings.ToValidUTF8(runToolCall(toolCtx, byName, call.GetFunction()), "\uFFFD")
			result = ToolResult(call, content)
		}()
	}
	results := make([]*llmrelayv1.Message, len(calls))
	var late <-chan time.Time // the timeout, once ctx ended before it
	for waiting := len(calls); waiting > 0; {
		select {
		case answer := <-done:
			results[answer.i] = answer.result
			waiting--
		case <-ended:
			var timedOut *toolTimeoutError
			if errors.As(context.Cause(toolCtx), &timedOut) {
				return answerUnfinished(toolCtx, calls, results)
			}
			// ctx ended first: the calls are waited for still, as without a timeout (those that honour it are
			// answered with what they did), but no longer than the timeout.
			ended = nil
			timer := time.NewTimer(time.Until(deadline))
			defer timer.Stop()
			late = timer.C
		case <-late:
			return answerUnfinished(toolCtx, calls, results)
		}
	}
	return results
}

// answerUnfinished answers each call still running (its result nil) once the step gave up on it, toolCtx having
// ended: that it did not finish within its timeout, or that the run was cancelled. Its goroutine returns by itself.
func answerUnfinished(toolCtx context.Context, calls []*llmrelayv1.ToolCall,
	results []*llmrelayv1.Message) []*llmrelayv1.Message {
	for i, call := range calls {
		if results[i] == nil {
			results[i] = ToolResult(call, endedResult(toolCtx))
		}
	}
	return results
}

// runToolCall runs one call and returns the content of its tool message.
func runToolCall(ctx context.Context, tools map[string]Tool, call *llmrelayv1.FunctionCall) (content string) {
	name := call.GetName()
	tool, ok := tools[name]
	if !ok {
		names := strings.Join(slices.Sorted(maps.Keys(tools)), ", ")
		if names == "" {
			names = "none" // as the Python and TypeScript SDKs say it, where an empty list would read as cut off
		}
		return fmt.Sprintf("error: there is no tool %q; the tools are: %s", name, names)
	}
	if ctx.Err() != nil {
		// The run ended before the tool started: it does not start, as in the TypeScript SDK (one that does not
		// read its context, sending an email, would act all the same, and its answer be dropped for cancelledResult).
		return endedResult(ctx)
	}
	defer func() {
		if recovered := recover(); recovered != nil {
			content = fmt.Sprintf("error: tool %q failed: it panicked: %v", name, recovered)
		}
	}()
	result, err := tool.handler(ctx, json.RawMessage(call.GetArguments()))
	var invalid argumentsError
	switch {
	case errors.As(err, &invalid):
		return fmt.Sprintf("error: tool %q cannot take the arguments %s: %v", name, call.GetArguments(), invalid.err)
	case ctx.Err() != nil:
		// The run ended before the tool returned: what it returned then (ctx's error, from a tool that honours its
		// context, or whatever it had so far) is not its answer, and the model that reads the conversation later is
		// told why it has none (a tool past its timeout: that it did not finish in time).
		return endedResult(ctx)
	case err != nil:
		return fmt.Sprintf("error: tool %q failed: %v", name, err)
	}
	return result
}

// decodeArguments decodes a call's arguments into Args ("" counts as {}), refusing text that is not JSON, an unknown
// property, and what falls short of Args' schema where encoding/json would decode it all the same (shape: a required
// property missing or null at any depth, ...).
func decodeArguments[Args any](arguments json.RawMessage, shape *shape) (Args, error) {
	var args Args
	if len(bytes.TrimSpace(arguments)) == 0 {
		arguments = json.RawMessage("{}")
	}
	if err := checkObject(arguments); err != nil {
		return args, err
	}
	if err := shape.check(arguments, ""); err != nil {
		return args, err
	}
	if rewritten := shape.wholeNumbers(arguments); rewritten != nil {
		arguments = rewritten // 3.0 for an int, which encoding/json refuses: 3
	}
	decoder := json.NewDecoder(bytes.NewReader(arguments))
	decoder.DisallowUnknownFields()
	if err := decoder.Decode(&args); err != nil {
		return args, err
	}
	return args, nil
}

// checkObject refuses arguments that are not a JSON object: not JSON, or another JSON value (null too, which
// json.Unmarshal takes into a map as a nil one), as the Python and TypeScript SDKs do for every tool. Another value
// is named by its JSON kind, in their words ("they must be a JSON object, not an array"), not by the Go type
// encoding/json could not fill, which the model does not know.
func checkObject(arguments json.RawMessage) error {
	if !json.Valid(arguments) {
		var value any
		return fmt.Errorf("not a JSON object: %w", json.Unmarshal(arguments, &value)) // the decoder's words of where
	}
	if kind := jsonType(arguments); kind != "an object" {
		return fmt.Errorf("they must be a JSON object, not %s", kind)
	}
	return nil
}

// resultText is a handler's result as the tool message's content: a string as it is, anything else as JSON.
func resultText(result any) (string, error) {
	switch r := result.(type) {
	case string:
		return r, nil
	case json.RawMessage:
		return string(r), nil
	}
	text, err := json.Marshal(result)
	if err != nil {
		return "", fmt.Errorf("its result cannot be encoded as JSON: %w", err)
	}
	return string(text), nil
}

package llmrelay_test

// Unit tests of tools: NewTool's definition and argument checks, RunToolCalls (parallel, errors and panics as
// results, the context passed on), and an Agent's refusals (two tools of one name, a negative ToolTimeout). No server.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/llmrelay/llmrelay/client/go/llmrelay"
	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

type addArgs struct {
	A int `json:"a"`
	B int `json:"b"`
}

type sum struct {
	Sum int `json:"sum"`
}

// mustTool fails the test unless a tool was made: mustTool(t)(llmrelay.NewTool(...)).
func mustTool(t *testing.T) func(llmrelay.Tool, error) llmrelay.Tool {
	return func(tool llmrelay.Tool, err error) llmrelay.Tool {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return tool
	}
}

func call(id, name, arguments string) *llmrelayv1.ToolCall {
	return &llmrelayv1.ToolCall{Id: id, Function: &llmrelayv1.FunctionCall{Name: name, Arguments: arguments}}
}

func addTool(t *testing.T) llmrelay.Tool {
	return mustTool(t)(llmrelay.NewTool("add", "Adds two integers", func(_ context.Context, args addArgs) (sum, error) {
		return sum{args.A + args.B}, nil
	}))
}

func TestNewToolDefinition(t *testing.T) {
	definition := addTool(t).Definition().GetFunction()
	if definition.GetName() != "add" || definition.GetDescription() != "Adds two integers" {
		t.Errorf("definition %v", definition)
	}
	schema, err := llmrelay.SchemaOf[addArgs]()
	if err != nil {
		t.Fatal(err)
	}
	if definition.GetParametersJson() != string(schema) {
		t.Errorf("parameters %s, want SchemaOf's %s", definition.GetParametersJson(), schema)
	}
	if _, err := llmrelay.NewTool("bad", "", func(context.Context, []string) (string, error) { return "", nil }); err == nil ||
		!strings.Contains(err.Error(), `tool "bad"`) {
		t.Errorf("a tool of []string arguments: %v; want an error naming the tool", err)
	}
	if _, err := llmrelay.NewRawTool("bad", "", json.RawMessage(`{"type":`), nil); err == nil {
		t.Error("a tool whose schema is not JSON was made")
	}
}

func TestRunToolCallsAnswersEachCallInOrder(t *testing.T) {
	echo := mustTool(t)(llmrelay.NewRawTool("echo", "", nil, func(_ context.Context, arguments json.RawMessage) (string, error) {
		return string(arguments), nil
	}))
	results := llmrelay.RunToolCalls(context.Background(), []llmrelay.Tool{addTool(t), echo}, []*llmrelayv1.ToolCall{
		call("call_1", "add", `{"a": 2, "b": 3}`),
		call("call_2", "echo", ""),
		call("call_3", "add", `{"a": 1, "b": -1}`),
	})
	want := []struct{ id, name, content string }{
		{"call_1", "add", `{"sum":5}`}, {"call_2", "echo", "{}"}, {"call_3", "add", `{"sum":0}`}}
	if len(results) != len(want) {
		t.Fatalf("%d results for %d calls", len(results), len(want))
	}
	for i, result := range results {
		// The name too, as the other SDKs' results have it.
		if result.GetRole() != llmrelayv1.Role_ROLE_TOOL || result.GetToolCallId() != want[i].id ||
			result.Name == nil || result.GetName() != want[i].name || result.GetContent() != want[i].content {
			t.Errorf("result %d: %s %q %q %q; want tool %q %q %q", i, result.GetRole(), result.GetToolCallId(),
				result.GetName(), result.GetContent(), want[i].id, want[i].name, want[i].content)
		}
	}
}

func TestRunToolCallsTurnsFailuresIntoResults(t *testing.T) {
	failing := mustTool(t)(llmrelay.NewTool("fail", "", func(context.Context, struct{}) (string, error) {
		return "", errors.New("the disk is full")
	}))
	panicking := mustTool(t)(llmrelay.NewTool("panic", "", func(context.Context, struct{}) (string, error) {
		panic("index out of range")
	}))
	unencodable := mustTool(t)(llmrelay.NewTool("nan", "", func(context.Context, struct{}) (float64, error) {
		return float64(0) / zero(), nil
	}))
	echo := mustTool(t)(llmrelay.NewRawTool("echo", "", nil, func(_ context.Context, arguments json.RawMessage) (string, error) {
		return string(arguments), nil
	}))
	tools := []llmrelay.Tool{addTool(t), failing, panicking, unencodable, echo}
	cases := []struct {
		call *llmrelayv1.ToolCall
		want []string
	}{
		{call("1", "fail", "{}"), []string{`error: tool "fail" failed: the disk is full`}},
		{call("2", "panic", ""), []string{`error: tool "panic" failed: it panicked: index out of range`}},
		{call("3", "nan", "{}"), []string{`error: tool "nan" failed`, "cannot be encoded as JSON"}},
		{call("4", "subtract", "{}"), []string{`error: there is no tool "subtract"`, "add, echo, fail, nan, panic"}},
		{call("5", "add", `{"a": 1, "b":`), []string{`error: tool "add" cannot take the arguments`, "not a JSON object"}},
		{call("6", "add", `{"a": 1}`), []string{`the required property "b" is missing`}},
		{call("7", "add", `{"a": 1, "b": 2, "c": 3}`), []string{`there is no property "c" (the properties are: a, b)`}},
		{call("8", "add", `{"a": "one", "b": 2}`), []string{`cannot take the arguments {"a": "one", "b": 2}`}},
		// Named by their JSON kind, as the other SDKs name them: encoding/json's error named a Go map type.
		{call("9", "add", `[1, 2]`), []string{`cannot take the arguments [1, 2]: they must be a JSON object, not an array`}},
		// null is no object: json.Unmarshal took it into a nil map, and a tool whose fields are all optional ran.
		{call("10", "add", `null`), []string{"they must be a JSON object, not null"}},
		{call("11", "echo", `null`), []string{`error: tool "echo" cannot take the arguments null: they must be a JSON object, not null`}},
		{call("12", "echo", `5`), []string{`error: tool "echo" cannot take the arguments 5: they must be a JSON object, not a number`}},
		{call("13", "add", `"1 and 2"`), []string{"they must be a JSON object, not a string"}},
		{call("14", "echo", `true`), []string{"they must be a JSON object, not a boolean"}},
	}
	var calls []*llmrelayv1.ToolCall
	for _, c := range cases {
		calls = append(calls, c.call)
	}
	results := llmrelay.RunToolCalls(context.Background(), tools, calls)
	for i, c := range cases {
		for _, want := range c.want {
			if !strings.Contains(results[i].GetContent(), want) {
				t.Errorf("call %s to %q: result %q, want it to say %q", c.call.GetId(), c.call.GetFunction().GetName(),
					results[i].GetContent(), want)
			}
		}
		if results[i].GetToolCallId() != c.call.GetId() {
			t.Errorf("result %d answers %q, want %q", i, results[i].GetToolCallId(), c.call.GetId())
		}
	}
}

func TestRunToolCallsWithoutToolsSaysThereAreNone(t *testing.T) {
	// An empty list read as cut off: "the tools are: ", where the other SDKs say "none".
	results := llmrelay.RunToolCalls(context.Background(), nil, []*llmrelayv1.ToolCall{call("1", "f", "{}")})
	if got, want := results[0].GetContent(), `error: there is no tool "f"; the tools are: none`; got != want {
		t.Errorf("result %q, want %q", got, want)
	}
}

// A handler that ends its goroutine (runtime.Goexit, as t.FailNow or t.Skip inside a tool does) neither returns nor
// panics: its call still gets a result, so that the conversation holds no unanswered call (nil, which every later
// model call would refuse), and the other calls keep theirs.
func TestRunToolCallsAnswersAToolThatEndsItsGoroutine(t *testing.T) {
	quitting := mustTool(t)(llmrelay.NewTool("quits", "", func(context.Context, struct{}) (string, error) {
		runtime.Goexit()
		return "unreachable", nil
	}))
	results := llmrelay.RunToolCalls(context.Background(), []llmrelay.Tool{addTool(t), quitting},
		[]*llmrelayv1.ToolCall{call("1", "quits", "{}"), call("2", "add", `{"a": 1, "b": 2}`)})
	if len(results) != 2 || results[0] == nil || results[1] == nil {
		t.Fatalf("results %v; want one for each call", results)
	}
	if results[0].GetContent() != `error: tool "quits" ended without a result` || results[0].GetToolCallId() != "1" ||
		results[0].GetName() != "quits" || results[0].GetRole() != llmrelayv1.Role_ROLE_TOOL {
		t.Errorf("result of the call to quits: %v", results[0])
	}
	if results[1].GetContent() != `{"sum":3}` || results[1].GetToolCallId() != "2" {
		t.Errorf("result of the call to add: %v", results[1])
	}
}

func TestRunToolCallsMakesEveryResultUTF8(t *testing.T) {
	// gRPC refuses to send a string field that is not UTF-8: the bytes it is not are each run replaced by U+FFFD.
	latin1 := mustTool(t)(llmrelay.NewRawTool("read", "", nil, func(context.Context, json.RawMessage) (string, error) {
		return "caf\xe9 cr\xe8me", nil
	}))
	failing := mustTool(t)(llmrelay.NewRawTool("fail", "", nil, func(context.Context, json.RawMessage) (string, error) {
		return "", errors.New("no file na\xefve.txt")
	}))
	panicking := mustTool(t)(llmrelay.NewRawTool("panic", "", nil, func(context.Context, json.RawMessage) (string, error) {
		panic("cut mid-rune: \xe2\x82")
	}))
	results := llmrelay.RunToolCalls(context.Background(), []llmrelay.Tool{latin1, failing, panicking},
		[]*llmrelayv1.ToolCall{call("1", "read", ""), call("2", "fail", ""), call("3", "panic", "")})
	want := []string{
		"caf\uFFFD cr\uFFFDme",
		"error: tool \"fail\" failed: no file na\uFFFDve.txt",
		"error: tool \"panic\" failed: it panicked: cut mid-rune: \uFFFD",
	}
	for i, result := range results {
		if result.GetContent() != want[i] {
			t.Errorf("result %d: %q, want %q", i, result.GetContent(), want[i])
		}
	}
}

func zero() float64 { return 0 }

func TestRunToolCallsRunsThemAtOnce(t *testing.T) {
	// Each call waits for the other to start: run one after the other, they would wait out the deadline.
	started := make(chan struct{}, 2)
	rendezvous := mustTool(t)(llmrelay.NewTool("rendezvous", "", func(ctx context.Context, _ struct{}) (string, error) {
		started <- struct{}{}
		deadline := time.After(10 * time.Second)
		for len(started) < 2 {
			select {
			case <-deadline:
				return "", errors.New("alone: the other call did not start")
			case <-time.After(time.Millisecond):
			}
		}
		return "met", nil
	}))
	results := llmrelay.RunToolCalls(context.Background(), []llmrelay.Tool{rendezvous},
		[]*llmrelayv1.ToolCall{call("1", "rendezvous", "{}"), call("2", "rendezvous", "{}")})
	for i, result := range results {
		if result.GetContent() != "met" {
			t.Errorf("call %d: %q", i, result.GetContent())
		}
	}
}

type requestKey struct{}

func TestRunToolCallsPassesTheContext(t *testing.T) {
	ctx := context.WithValue(context.Background(), requestKey{}, "request 7")
	reading := mustTool(t)(llmrelay.NewTool("read", "", func(ctx context.Context, _ struct{}) (string, error) {
		said, _ := ctx.Value(requestKey{}).(string)
		return said, nil
	}))
	results := llmrelay.RunToolCalls(ctx, []llmrelay.Tool{reading}, []*llmrelayv1.ToolCall{call("1", "read", "{}")})
	if got := results[0].GetContent(); got != "request 7" {
		t.Errorf("result %q, want the value of the caller's context", got)
	}
}

// A tool still running when the run's context ends is answered as the other SDKs answer it, whatever it returns
// then: its context's error (a tool that honours it), or what it had so far (one that does not). A call whose
// arguments were refused says so still: its tool never ran.
func TestRunToolCallsAnswersTheCallsOfACancelledRun(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	var running sync.WaitGroup
	running.Add(2)
	go func() {
		running.Wait()
		cancel()
	}()
	honouring := mustTool(t)(llmrelay.NewTool("honours", "", func(ctx context.Context, _ struct{}) (string, error) {
		running.Done()
		<-ctx.Done()
		return "", ctx.Err()
	}))
	ignoring := mustTool(t)(llmrelay.NewTool("ignores", "", func(ctx context.Context, _ struct{}) (string, error) {
		running.Done()
		<-ctx.Done()
		return "half of it", nil
	}))
	results := llmrelay.RunToolCalls(ctx, []llmrelay.Tool{honouring, ignoring, addTool(t)}, []*llmrelayv1.ToolCall{
		call("1", "honours", "{}"), call("2", "ignores", "{}"), call("3", "add", `{"a": 1}`)})
	want := []string{
		"error: the run was cancelled before the tool finished",
		"error: the run was cancelled before the tool finished",
		`error: tool "add" cannot take the arguments {"a": 1}: the required property "b" is missing`,
	}
	for i, result := range results {
		// The third call's goroutine may start after the cancel: then it does not start its tool.
		if result.GetContent() != want[i] && (i < 2 || result.GetContent() != want[0]) {
			t.Errorf("result %d: %q, want %q", i, result.GetContent(), want[i])
		}
	}
}

// A run cancelled before its tools start starts none, as in the TypeScript SDK: one that does not read its context
// (sending an email) acted all the same, and its answer was dropped for "cancelled", which the model may call again.
func TestRunToolCallsStartsNoToolOfACancelledRun(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var ran atomic.Int32
	send := mustTool(t)(llmrelay.NewTool("send", "", func(context.Context, struct{}) (string, error) {
		ran.Add(1)
		return "sent", nil
	}))
	results := llmrelay.RunToolCalls(ctx, []llmrelay.Tool{send}, []*llmrelayv1.ToolCall{call("1", "send", "{}")})
	if got := results[0].GetContent(); got != "error: the run was cancelled before the tool finished" || ran.Load() != 0 {
		t.Errorf("result %q after %d runs; want it cancelled, and the tool never run", got, ran.Load())
	}
}

type point struct {
	X int `json:"x"`
	Y int `json:"y,omitempty"`
}

type pathArgs struct {
	Start  point            `json:"start"`
	Via    []point          `json:"via,omitempty"`
	Named  map[string]point `json:"named,omitempty"`
	End    *point           `json:"end"` // required, and null is a value of it: no end
	Size   [2]int           `json:"size,omitempty"`
	Steps  int              `json:"steps"`
	Weight int              `json:"weight,string"`
	Notes  any              `json:"notes"` // any JSON value, null too
}

// The schema's required properties are required at every depth, and null is no value of a field that cannot hold it:
// encoding/json alone would hand the handler zeros for them.
func TestNewToolChecksTheArgumentsAtEveryDepth(t *testing.T) {
	var ran atomic.Int32 // the calls run at once
	tool := mustTool(t)(llmrelay.NewTool("path", "", func(_ context.Context, args pathArgs) (string, error) {
		ran.Add(1)
		return "ok", nil
	}))
	valid := `"start": {"x": 1}, "end": null, "steps": 3, "weight": "2", "notes": null`
	cases := []struct {
		arguments string
		want      string // "ok": the handler ran
	}{
		{"{" + valid + "}", "ok"},
		{`{"start": {"x": 1}, "end": {"x": 2}, "steps": 0, "weight": "-2", "notes": 1, "via": [{"x": 3}, {"x": 4, "y": 5}],
			"named": {"a": {"x": 6}}, "size": [7, 8]}`, "ok"},
		// A missing property is said of its object, at the object's path, in the Python and TypeScript SDKs' words
		// (Go's said `the required property "start.x" is missing`).
		{`{"start": {}, "end": null, "steps": 3, "weight": "2", "notes": null}`,
			`start: the required property "x" is missing`},
		{`{"start": {"x": null}, "end": null, "steps": 3, "weight": "2", "notes": null}`,
			`start: the required property "x" is missing (it is null)`},
		{`{"start": null, "end": null, "steps": 3, "weight": "2", "notes": null}`,
			`the required property "start" is missing (it is null)`},
		{`{"start": {"x": 1}, "end": null, "steps": null, "weight": "2", "notes": null}`,
			`the required property "steps" is missing (it is null)`},
		{`{"start": {"x": 1}, "end": null, "steps": 3, "weight": "null", "notes": null}`,
			`the required property "weight" is missing (it is null)`},
		{`{"start": {"x": 1}, "steps": 3, "weight": "2", "notes": null}`, `the required property "end" is missing`},
		{"{" + valid + `, "end": {"y": 1}}`, `end: the required property "x" is missing`},
		{"{" + valid + `, "via": [{"x": 1}, {"y": 2}]}`, `via[1]: the required property "x" is missing`},
		{"{" + valid + `, "via": [{"x": 1}, null]}`, `via[1]: expected an object, got null`},
		{"{" + valid + `, "named": {"a": {"x": 1}, "b": {}}}`, `named.b: the required property "x" is missing`},
		{"{" + valid + `, "size": [1, 2, 3]}`, `the property "size" takes exactly 2 items, not 3`},
		{"{" + valid + `, "size": [1]}`, `the property "size" takes exactly 2 items, not 1`},
		// Of another JSON type than the schema's, or a property it does not have: in the other SDKs' words, with its
		// path (the decoder's said "cannot unmarshal number", and `unknown field "z"` with no path).
		{`{"start": 5, "end": null, "steps": 3, "weight": "2", "notes": null}`, "start: expected an object, got a number"},
		{"{" + valid + `, "steps": 1.5}`, "steps: expected an integer, got 1.5"},
		{"{" + valid + `, "via": [{"x": "1"}]}`, `via[0].x: expected an integer, got a string`},
		{"{" + valid + `, "start": {"x": 1, "z": 2}}`, `start: there is no property "z" (the properties are: x, y)`},
		// Every problem at once (the decoder, and these checks, stopped at the first).
		{`{"start": {"z": 1}, "end": null, "steps": "3", "weight": "2", "notes": null, "extra": true}`,
			`start: the required property "x" is missing; start: there is no property "z" (the properties are: x, y); ` +
				`steps: expected an integer, got a string; there is no property "extra" (the properties are: start, via, ` +
				`named, end, size, steps, weight, notes)`},
	}
	var calls []*llmrelayv1.ToolCall
	for i, c := range cases {
		calls = append(calls, call(strconv.Itoa(i), "path", c.arguments))
	}
	results := llmrelay.RunToolCalls(context.Background(), []llmrelay.Tool{tool}, calls)
	var handled int32
	for i, c := range cases {
		got := results[i].GetContent()
		if c.want == "ok" {
			handled++
			if got != "ok" {
				t.Errorf("arguments %s: %q, want the handler's result", c.arguments, got)
			}
			continue
		}
		if !strings.HasPrefix(got, `error: tool "path" cannot take the arguments`) || !strings.Contains(got, c.want) {
			t.Errorf("arguments %s: %q, want it refused: %q", c.arguments, got, c.want)
		}
	}
	if ran.Load() != handled {
		t.Errorf("the handler ran %d times, want %d: only for the arguments that meet the schema", ran.Load(), handled)
	}
}

// enumArgs have fields that take only the values of their enum tags: a string, an integer, a number behind a pointer,
// a number read from a JSON string (the ,string option) and a type read through UnmarshalText.
type enumArgs struct {
	Unit  string   `json:"unit" enum:"celsius,fahrenheit"`
	Days  int      `json:"days,omitempty" enum:"1,3,7"`
	Scale *float64 `json:"scale,omitempty" enum:"1.5,2"`
	Ratio float64  `json:"ratio,omitempty,string" enum:"0.5,1.50"`
	Level level    `json:"level,omitempty" enum:"low,high"`
}

// A value the schema's enum does not list is refused, as the Python and TypeScript SDKs refuse it: the handler got
// "kelvin" for a unit of celsius or fahrenheit. A value is read as encoding/json reads it (1.50 is 1.5).
func TestNewToolHoldsTheArgumentsToTheirEnums(t *testing.T) {
	tool := mustTool(t)(llmrelay.NewTool("weather", "", func(_ context.Context, args enumArgs) (string, error) {
		scale := 0.0
		if args.Scale != nil {
			scale = *args.Scale
		}
		return fmt.Sprintf("%s %d %g %g %d", args.Unit, args.Days, scale, args.Ratio, args.Level), nil
	}))
	cases := []struct{ arguments, want string }{
		{`{"unit": "celsius", "days": 3, "scale": 1.50, "ratio": "1.50", "level": "high"}`, "celsius 3 1.5 1.5 1"},
		{`{"unit": "fahrenheit", "scale": null, "ratio": "5e-1"}`, "fahrenheit 0 0 0.5 0"},
		{`{"unit": "celsius", "days": 7.0}`, "celsius 7 0 0 0"}, // a whole number, as encoding/json does not read it
		{`{"unit": "kelvin"}`, `unit: expected one of "celsius", "fahrenheit", got "kelvin"`},
		{`{"unit": "celsius", "days": 2, "scale": 1e0, "ratio": "2", "level": "middling"}`,
			`days: expected one of 1, 3, 7, got 2; scale: expected one of 1.5, 2, got 1; ` +
				`ratio: expected one of "0.5", "1.5", got "2"; level: expected one of "low", "high", got "middling"`},
		// Of another type, the type alone is said.
		{`{"unit": 5, "days": 2.5}`, "unit: expected a string, got a number; days: expected an integer, got 2.5"},
	}
	var calls []*llmrelayv1.ToolCall
	for i, c := range cases {
		calls = append(calls, call(strconv.Itoa(i), "weather", c.arguments))
	}
	for i, result := range llmrelay.RunToolCalls(context.Background(), []llmrelay.Tool{tool}, calls) {
		want := cases[i].want
		if strings.Contains(want, ": expected") {
			want = `error: tool "weather" cannot take the arguments ` + cases[i].arguments + ": " + want
		}
		if result.GetContent() != want {
			t.Errorf("arguments %s: %q, want %q", cases[i].arguments, result.GetContent(), want)
		}
	}
}

// A whole number written with a fraction or an exponent (3.0, 1e2) is an integer, as the Python and TypeScript SDKs
// take it and JSON Schema's "integer" says, at any depth: it was refused ("expected an integer, got 3.0"), as
// encoding/json refuses it for an int.
func TestNewToolTakesWholeNumbersWrittenAsDecimalsForIntegers(t *testing.T) {
	tool := mustTool(t)(llmrelay.NewTool("path", "", func(_ context.Context, args pathArgs) (string, error) {
		named := args.Named["a"]
		return fmt.Sprintf("%d %d %d %v %d %d", args.Start.X, args.Steps, args.Via[0].X, args.Size, named.X,
			args.Weight), nil
	}))
	results := llmrelay.RunToolCalls(context.Background(), []llmrelay.Tool{tool}, []*llmrelayv1.ToolCall{
		call("1", "path", `{"start": {"x": 3.0}, "end": null, "steps": 1e2, "weight": "2", "notes": 2.5, `+
			`"via": [{"x": -4.00}], "size": [5E0, 0.6e1], "named": {"a": {"x": 70e-1}}}`),
		call("2", "path", `{"start": {"x": 3.000000000000000000001}, "end": null, "steps": 1.5e0, "weight": "2", `+
			`"notes": null}`),
	})
	want := []string{"3 100 -4 [5 6] 7 2", `error: tool "path" cannot take the arguments {"start": {"x": ` +
		`3.000000000000000000001}, "end": null, "steps": 1.5e0, "weight": "2", "notes": null}: start.x: expected an ` +
		`integer, got 3.000000000000000000001; steps: expected an integer, got 1.5e0`}
	for i, result := range results {
		if result.GetContent() != want[i] {
			t.Errorf("result %d: %q, want %q", i, result.GetContent(), want[i])
		}
	}
}

// A tool whose arguments have fields of one JSON name runs: its schema and its check hold the one field that
// encoding/json reads (they held each, listed the name twice in "required", and refused every value of it).
func TestNewToolTakesWhatEncodingJSONReadsOfFieldsOfOneName(t *testing.T) {
	tool := mustTool(t)(llmrelay.NewTool("shadow", "", func(_ context.Context, args shadowArgs) (string, error) {
		return fmt.Sprintf("%d %s %s %d %d", args.ID, args.Label, args.Title, args.Count, args.X), nil
	}))
	results := llmrelay.RunToolCalls(context.Background(), []llmrelay.Tool{tool}, []*llmrelayv1.ToolCall{
		call("1", "shadow", `{"id": 5, "label": "l", "Name": "n", "count": 2, "in": {"X": 1}}`),
		call("2", "shadow", `{"id": "5", "label": "l", "Name": "n", "count": 2, "in": {"X": 1}, "Both": "b"}`),
	})
	want := []string{"5 l n 2 1", `error: tool "shadow" cannot take the arguments {"id": "5", "label": "l", "Name": "n", ` +
		`"count": 2, "in": {"X": 1}, "Both": "b"}: id: expected an integer, got a string; there is no property "Both" ` +
		`(the properties are: id, label, Name, count, in)`}
	for i, result := range results {
		if result.GetContent() != want[i] {
			t.Errorf("result %d: %q, want %q", i, result.GetContent(), want[i])
		}
	}
}

// A tool whose arguments have fields that encoding/json reads from a JSON string (UnmarshalText: netip.Addr, an enum
// of names) runs with them: its schema and its check took them for what their Go types are (an object, an integer).
func TestNewToolTakesTextTypesAsStrings(t *testing.T) {
	tool := mustTool(t)(llmrelay.NewTool("ping", "", func(_ context.Context, args textArgs) (string, error) {
		return fmt.Sprintf("%s %d %s", args.Addr, args.Level, args.Via), nil
	}))
	results := llmrelay.RunToolCalls(context.Background(), []llmrelay.Tool{tool}, []*llmrelayv1.ToolCall{
		call("1", "ping", `{"addr": "10.0.0.1", "level": "high", "via": "10.0.0.0/8"}`),
		call("2", "ping", `{"addr": {}, "level": 1, "levels": [0], "named": {"a": null}}`),
	})
	want := []string{"10.0.0.1 1 10.0.0.0/8", `error: tool "ping" cannot take the arguments {"addr": {}, "level": 1, ` +
		`"levels": [0], "named": {"a": null}}: addr: expected a string, got an object; level: expected a string, got a ` +
		`number; levels[0]: expected a string, got a number; named.a: expected a string, got null`}
	for i, result := range results {
		if result.GetContent() != want[i] {
			t.Errorf("result %d: %q, want %q", i, result.GetContent(), want[i])
		}
	}
}

// A type that refers to itself through a map, a slice, an array or a pointer is an error of NewTool's, as through a
// struct (it overflowed the stack, which ends the process, or, for a pointer to itself, ran forever).
func TestNewToolRefusesATypeThatRefersToItself(t *testing.T) {
	handler := func(context.Context, struct{ T *tree }) (string, error) { return "", nil }
	if _, err := llmrelay.NewTool("walk", "", handler); err == nil ||
		!strings.Contains(err.Error(), "llmrelay_test.tree refers to itself") {
		t.Errorf("NewTool: %v, want the recursive type refused", err)
	}
	pointer := func(context.Context, struct{ P loop }) (string, error) { return "", nil }
	if _, err := llmrelay.NewTool("loop", "", pointer); err == nil ||
		!strings.Contains(err.Error(), "llmrelay_test.loop refers to itself") {
		t.Errorf("NewTool: %v, want the recursive type refused", err)
	}
}

func TestAgentRefusesANegativeToolTimeout(t *testing.T) {
	// No client: the run must end before any model call.
	agent := &llmrelay.Agent{Tools: []llmrelay.Tool{addTool(t)}, ToolTimeout: -time.Second}
	conversation := llmrelay.NewConversation(llmrelay.User("Add 1 and 2"))
	result, err := agent.Run(context.Background(), conversation)
	if err == nil || !strings.Contains(err.Error(), "Agent.ToolTimeout is -1s; it must be above 0, or 0 for no bound") {
		t.Fatalf("err = %v, want the negative timeout refused", err)
	}
	if result == nil || result.Steps != 0 || len(conversation.Messages) != 1 {
		t.Fatalf("result = %+v, conversation %d messages: want nothing done", result, len(conversation.Messages))
	}
}

func TestAgentRefusesToolsOfOneName(t *testing.T) {
	other := mustTool(t)(llmrelay.NewTool("add", "Adds otherwise", func(_ context.Context, args addArgs) (sum, error) {
		return sum{args.A - args.B}, nil
	}))
	// No client: the run must end before any model call.
	agent := &llmrelay.Agent{Tools: []llmrelay.Tool{addTool(t), other}}
	conversation := llmrelay.NewConversation(llmrelay.User("Add 1 and 2"))
	result, err := agent.Run(context.Background(), conversation)
	if err == nil || !strings.Contains(err.Error(), `two of Agent.Tools are named "add"`) {
		t.Fatalf("err = %v, want the duplicate name refused", err)
	}
	if result == nil || result.Steps != 0 || len(conversation.Messages) != 1 {
		t.Fatalf("result = %+v, conversation %d messages: want nothing done", result, len(conversation.Messages))
	}
}

type sizedArgs struct {
	Level int8    `json:"level"`
	Port  uint16  `json:"port"`
	Count uint    `json:"count"`
	ID    int64   `json:"id"`
	Ports []int32 `json:"ports,omitempty"`
}

// An integer past its field's type is refused in the SDKs' words, naming the range, as every other problem is, not in
// encoding/json's (which names a Go type the model does not know); the schema says the range of a type of 32 bits or
// fewer, and that an unsigned one takes no number below 0.
func TestNewToolTellsTheRangeOfSizedIntegers(t *testing.T) {
	schema, err := llmrelay.SchemaOf[sizedArgs]()
	if err != nil {
		t.Fatal(err)
	}
	want := `{"additionalProperties":false,"properties":{` +
		`"count":{"minimum":0,"type":"integer"},` +
		`"id":{"type":"integer"},` +
		`"level":{"maximum":127,"minimum":-128,"type":"integer"},` +
		`"port":{"maximum":65535,"minimum":0,"type":"integer"},` +
		`"ports":{"items":{"maximum":2147483647,"minimum":-2147483648,"type":"integer"},"type":"array"}` +
		`},"required":["level","port","count","id"],"type":"object"}`
	if string(schema) != want {
		t.Errorf("schema\n%s\nwant\n%s", schema, want)
	}
	tool := mustTool(t)(llmrelay.NewTool("sized", "", func(_ context.Context, args sizedArgs) (string, error) {
		return fmt.Sprintf("%d %d %d %d %v", args.Level, args.Port, args.Count, args.ID, args.Ports), nil
	}))
	cases := []struct{ arguments, want string }{
		{`{"level": -128, "port": 65535, "count": 0, "id": -9223372036854775808, "ports": [2147483647]}`,
			"-128 65535 0 -9223372036854775808 [2147483647]"},
		{`{"level": 1.27e2, "port": 0, "count": 18446744073709551615, "id": 9223372036854775807}`,
			"127 0 18446744073709551615 9223372036854775807 []"},
		{`{"level": 128, "port": 65536, "count": -1, "id": 9223372036854775808, "ports": [1, -2147483649]}`,
			"level: expected an integer from -128 to 127, got 128; port: expected an integer from 0 to 65535, got " +
				"65536; count: expected an integer from 0 to 18446744073709551615, got -1; id: expected an integer " +
				"from -9223372036854775808 to 9223372036854775807, got 9223372036854775808; ports[1]: expected an " +
				"integer from -2147483648 to 2147483647, got -2147483649"},
		{`{"level": 1e20, "port": 1, "count": 1, "id": 1}`,
			"level: expected an integer from -128 to 127, got 1e20"},
	}
	for _, c := range cases {
		result := llmrelay.RunToolCalls(context.Background(), []llmrelay.Tool{tool},
			[]*llmrelayv1.ToolCall{call("1", "sized", c.arguments)})[0].GetContent()
		if result != c.want && !strings.HasSuffix(result, "}: "+c.want) {
			t.Errorf("arguments %s: %q, want %q", c.arguments, result, c.want)
		}
	}
}

package llmrelay_test

// Schemas as JSON text and images in messages: the builders, and what the upstream receives through the real gateway.

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"image"
	"image/png"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/llmrelay/llmrelay/client/go/internal/gatewaytest"
	"github.com/llmrelay/llmrelay/client/go/llmrelay"
	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

const catURL = "https://example.com/cat.png"

// lastRequest is the last chat request body the upstream received, its numbers as json.Number.
func lastRequest(t *testing.T) any {
	t.Helper()
	return lastRequestTo(t, env.Upstream)
}

// lastRequestTo is the last chat request that upstream received, decoded with its numbers as written.
func lastRequestTo(t *testing.T, upstream *gatewaytest.Upstream) any {
	t.Helper()
	requests, err := upstream.Requests()
	if err != nil {
		t.Fatal(err)
	}
	if len(requests) == 0 {
		t.Fatal("the upstream received no chat request")
	}
	decoder := json.NewDecoder(bytes.NewReader(requests[len(requests)-1]))
	decoder.UseNumber()
	var body any
	if err := decoder.Decode(&body); err != nil {
		t.Fatal(err)
	}
	return body
}

// at walks a decoded JSON value by object keys (strings) and array indexes (ints).
func at(t *testing.T, value any, path ...any) any {
	t.Helper()
	for _, step := range path {
		switch key := step.(type) {
		case string:
			object, ok := value.(map[string]any)
			if !ok {
				t.Fatalf("%v: not an object at %q", value, key)
			}
			value = object[key]
		case int:
			array, ok := value.([]any)
			if !ok || key >= len(array) {
				t.Fatalf("%v: no item %d", value, key)
			}
			value = array[key]
		}
	}
	return value
}

func TestSchemasGivenAsTextAreSentUnchanged(t *testing.T) {
	const text = `{"type": "object",  "properties": {"n": {"type": "integer", "maximum": 1152921504606846977}}}`
	for _, schema := range []any{text, []byte(text), json.RawMessage(text)} {
		tool, err := llmrelay.FunctionTool("f", "", schema)
		if err != nil {
			t.Fatal(err)
		}
		format, err := llmrelay.JSONSchemaFormat("s", schema)
		if err != nil {
			t.Fatal(err)
		}
		function := tool.GetFunction()
		if function.GetParametersJson() != text || format.GetJsonSchema().GetSchemaJson() != text {
			t.Errorf("%T: sent %q and %q, want the text as it is", schema, function.GetParametersJson(), format.GetJsonSchema().GetSchemaJson())
		}
		if function.Description != nil || function.Parameters != nil || format.GetJsonSchema().Schema != nil {
			t.Errorf("%T: fields set beyond the text: %v, %v", schema, function, format)
		}
	}
}

func TestASchemaThatIsNotJSONIsAnError(t *testing.T) {
	if _, err := llmrelay.FunctionTool("f", "", map[string]any{"bad": make(chan int)}); err == nil {
		t.Error("FunctionTool encoded a channel")
	}
	if _, err := llmrelay.JSONSchemaFormat("s", func() {}); err == nil {
		t.Error("JSONSchemaFormat encoded a func")
	}
}

func TestNoSchemaInAnyFormIsNone(t *testing.T) {
	// A nil map (or pointer, or empty text) went out as "null" or "", which the gateway refuses: "nil for none" was
	// true of an untyped nil alone.
	var noMap map[string]any
	var noStruct *struct{ A int }
	for _, none := range []any{nil, noMap, noStruct, json.RawMessage(nil), "", []byte(" ")} {
		tool, err := llmrelay.FunctionTool("f", "", none)
		if err != nil || tool.Function.ParametersJson != nil {
			t.Errorf("FunctionTool(%#v): %v, parameters %v; want none", none, err, tool.GetFunction().ParametersJson)
		}
		if _, err := llmrelay.JSONSchemaFormat("s", none); err == nil {
			t.Errorf("JSONSchemaFormat(%#v) took no schema for one", none)
		}
	}
}

func TestDialSkipsANilOptionAndRefusesAHeaderKeyGRPCCannotSend(t *testing.T) {
	client, err := llmrelay.Dial("127.0.0.1:1", nil, llmrelay.WithHeader("X-Team", "a")) // it panicked on the nil
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	client.Close()
	// Taken, every call failed Internal, "header key ... contains illegal characters", as though the gateway had.
	if _, err := llmrelay.Dial("127.0.0.1:1", llmrelay.WithHeader("Bad Key", "v")); err == nil {
		t.Error(`Dial took the metadata key "Bad Key"`)
	}
}

func TestDialRefusesAHeaderValueGRPCCannotSendWithoutShowingIt(t *testing.T) {
	// A key read from a file with its newline: taken, every call failed Internal, "header key "authorization" contains
	// value with non-printable ASCII characters", as though the gateway had.
	for _, value := range []string{"Bearer sk-live-SECRET\n", "Bearer sk-live-SECRET\x00", "Bearer sk-live-SÉCRET"} {
		_, err := llmrelay.Dial("127.0.0.1:1", llmrelay.WithHeader("Authorization", value))
		if err == nil {
			t.Errorf("Dial took the authorization value %q", value)
			continue
		}
		if !strings.Contains(err.Error(), `"authorization"`) || strings.Contains(err.Error(), "SECRET") ||
			strings.Contains(err.Error(), "SÉCRET") || !strings.Contains(err.Error(), "value not shown") {
			t.Errorf("Dial's error %q; want it to name the key and not show the value", err)
		}
	}
	// A key ending -bin carries bytes, any of them; printable ASCII with spaces is text gRPC sends.
	client, err := llmrelay.Dial("127.0.0.1:1", llmrelay.WithHeader("x-trace-bin", "\x00\xff\n"),
		llmrelay.WithHeader("x-note", " a ~ b "))
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	client.Close()
}

func TestSchemasReachTheUpstreamWithTheirIntegers(t *testing.T) {
	client := setup(t)
	schema := map[string]any{
		"type": "object",
		"properties": map[string]any{
			"tags": map[string]any{
				"type": "array", "maxItems": 3,
				"items": map[string]any{"type": "array", "items": map[string]any{"type": "integer", "default": 10}},
			},
			"id": map[string]any{"type": "integer", "maximum": uint64(1<<60 + 1)},
		},
	}
	tool, err := llmrelay.FunctionTool("tag", "Tags the text", schema)
	if err != nil {
		t.Fatal(err)
	}
	format, err := llmrelay.JSONSchemaFormat("tags", schema)
	if err != nil {
		t.Fatal(err)
	}
	options := &llmrelayv1.CompletionOptions{Tools: []*llmrelayv1.Tool{tool}, ResponseFormat: format}
	if _, err := client.Complete(testContext(t), &llmrelayv1.CompleteRequest{Messages: chat("tag this"), Options: options}); err != nil {
		t.Fatal(err)
	}
	body := lastRequest(t)
	for name, sent := range map[string]any{
		"tool parameters": at(t, body, "tools", 0, "function", "parameters"),
		"response schema": at(t, body, "response_format", "json_schema", "schema"),
	} {
		if got := at(t, sent, "properties", "tags", "maxItems"); got != json.Number("3") {
			t.Errorf("%s: maxItems arrived as %v, want 3", name, got)
		}
		if got := at(t, sent, "properties", "tags", "items", "items", "default"); got != json.Number("10") {
			t.Errorf("%s: default arrived as %v, want 10", name, got)
		}
		if got := at(t, sent, "properties", "id", "maximum"); got != json.Number("1152921504606846977") {
			t.Errorf("%s: maximum arrived as %v, want 1152921504606846977", name, got)
		}
	}
}

func TestUserImageSendsImagePartsFromBytesAndURLs(t *testing.T) {
	// Ollama's /v1 takes no image by URL, so the gateway sends this one to the next backend, an OpenAI-compatible one.
	client, gateway := setupFallback(t)
	var encoded bytes.Buffer
	if err := png.Encode(&encoded, image.NewGray(image.Rect(0, 0, 4, 3))); err != nil {
		t.Fatal(err)
	}
	fromBytes := llmrelay.ImageBytes(encoded.Bytes(), "") // the gateway reads the media type from the bytes
	fromBytes.Detail = llmrelayv1.ImageDetail_IMAGE_DETAIL_LOW
	message := llmrelay.UserImage("compare", fromBytes, llmrelay.ImageURL(catURL))

	resp, err := client.Complete(testContext(t), &llmrelayv1.CompleteRequest{Messages: []*llmrelayv1.Message{message}})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetMessage().GetContent(); got != "echo: compare" {
		t.Errorf("content %q, want the echo of the text part", got)
	}
	if got := resp.GetBackend(); got != gateway.FallbackBackend {
		t.Errorf("served by %q, want %q", got, gateway.FallbackBackend)
	}
	content := at(t, lastRequestTo(t, gateway.Upstream), "messages", 0, "content")
	want := []struct {
		path  []any
		value any
	}{
		{[]any{0, "type"}, "text"},
		{[]any{0, "text"}, "compare"},
		{[]any{1, "type"}, "image_url"},
		{[]any{1, "image_url", "url"}, "data:image/png;base64," + base64.StdEncoding.EncodeToString(encoded.Bytes())},
		{[]any{1, "image_url", "detail"}, "low"},
		{[]any{2, "image_url", "url"}, catURL},
	}
	for _, w := range want {
		if got := at(t, content, w.path...); got != w.value {
			t.Errorf("content%v = %v, want %v", w.path, got, w.value)
		}
	}
	if parts, _ := content.([]any); len(parts) != 3 {
		t.Errorf("%d content parts, want 3: %v", len(parts), content)
	}
}

func TestAnImageInAnAssistantMessageIsInvalidArgumentNamingThePart(t *testing.T) {
	client := setup(t)
	message := llmrelay.UserImage("", llmrelay.ImageURL(catURL))
	message.Role = llmrelayv1.Role_ROLE_ASSISTANT
	_, err := client.Complete(testContext(t), &llmrelayv1.CompleteRequest{Messages: []*llmrelayv1.Message{llmrelay.User("hi"), message}})
	violations := mustFail(t, err, codes.InvalidArgument).FieldViolations()
	if len(violations) != 1 || violations[0].GetField() != "messages[1].parts[0].image" {
		t.Errorf("violations %v, want one on messages[1].parts[0].image", violations)
	}
}

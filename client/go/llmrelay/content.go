package llmrelay

import (
	"encoding/json"
	"fmt"
	"strings"

	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

// FunctionTool is a function the model may call. parameters is its JSON Schema: a value encoding/json encodes (a
// map, a struct), or the JSON text itself as a string, []byte or json.RawMessage; nil (a nil map or pointer too) or
// empty text for none. The schema travels
// as JSON text (parameters_json), which the upstream gets as written: the deprecated Struct field would turn its
// integers into doubles (`"maxItems": 3` into 3.0) and lose large ones. description "" leaves it unset.
func FunctionTool(name, description string, parameters any) (*llmrelayv1.Tool, error) {
	function := &llmrelayv1.FunctionDefinition{Name: name}
	if description != "" {
		function.Description = &description
	}
	text, err := jsonText(parameters)
	if err != nil {
		return nil, fmt.Errorf("llmrelay: the parameters of tool %q: %w", name, err)
	}
	if text != "" {
		function.ParametersJson = &text
	}
	return &llmrelayv1.Tool{Function: function}, nil
}

// JSONSchemaFormat is the response format of an answer that is JSON following the schema, given as FunctionTool
// takes parameters and sent as JSON text (schema_json) too.
func JSONSchemaFormat(name string, schema any) (*llmrelayv1.ResponseFormat, error) {
	text, err := jsonText(schema)
	if err == nil && text == "" {
		err = fmt.Errorf("it is empty (nil)")
	}
	if err != nil {
		return nil, fmt.Errorf("llmrelay: the JSON schema %q: %w", name, err)
	}
	return &llmrelayv1.ResponseFormat{
		Type:       llmrelayv1.ResponseFormatType_RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
		JsonSchema: &llmrelayv1.JsonSchema{Name: name, SchemaJson: &text},
	}, nil
}

// jsonText is a schema as JSON text: text as it is, anything else encoded; "" for none (nil, a nil map or slice, or
// empty text), which encoding/json would send as null or the gateway refuse as no JSON at all.
func jsonText(schema any) (string, error) {
	var text string
	switch s := schema.(type) {
	case string:
		text = s
	case []byte:
		text = string(s)
	case json.RawMessage:
		text = string(s)
	default:
		encoded, err := json.Marshal(schema)
		if err != nil {
			return "", err
		}
		text = string(encoded)
	}
	if trimmed := strings.TrimSpace(text); trimmed == "" || trimmed == "null" {
		return "", nil
	}
	return text, nil
}

// UserImage is a user message of a text and images (ImageBytes, ImageURL), in that order; text "" leaves it out.
func UserImage(text string, images ...*llmrelayv1.ImagePart) *llmrelayv1.Message {
	var parts []*llmrelayv1.ContentPart
	if text != "" {
		parts = append(parts, &llmrelayv1.ContentPart{Part: &llmrelayv1.ContentPart_Text{Text: text}})
	}
	for _, image := range images {
		parts = append(parts, &llmrelayv1.ContentPart{Part: &llmrelayv1.ContentPart_Image{Image: image}})
	}
	return &llmrelayv1.Message{Role: llmrelayv1.Role_ROLE_USER, Parts: parts}
}

// ImageBytes is an image by its bytes: PNG, JPEG, GIF or WebP. mediaType ("image/png", ...) may be "": the gateway
// then reads it from the bytes. Set Detail on the result to choose how closely the model looks.
func ImageBytes(data []byte, mediaType string) *llmrelayv1.ImagePart {
	return &llmrelayv1.ImagePart{Source: &llmrelayv1.ImagePart_Data{Data: data}, MediaType: mediaType}
}

// ImageURL is an image the upstream fetches from an http(s) URL. Set Detail on the result to choose how closely the
// model looks.
func ImageURL(url string) *llmrelayv1.ImagePart {
	return &llmrelayv1.ImagePart{Source: &llmrelayv1.ImagePart_Url{Url: url}}
}

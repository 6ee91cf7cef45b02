package llmrelay_test

// Unit tests of SchemaOf: the JSON Schema of a tool's arguments, read from a struct. No server.

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/llmrelay/llmrelay/client/go/llmrelay"
)

type Place struct {
	City    string `json:"city" description:"The city, e.g. Paris"`
	Country string `json:"country,omitempty"`
}

type common struct {
	Verbose bool `json:"verbose,omitempty"`
}

type forecastArgs struct {
	common
	Place    Place              `json:"place"`
	Days     int                `json:"days" enum:"1,3,7"`
	Unit     string             `json:"unit,omitempty" enum:"celsius,fahrenheit" description:"Which scale"`
	Fields   []string           `json:"fields,omitzero"`
	Start    *time.Time         `json:"start,omitempty"`
	Extra    map[string]float64 `json:"extra,omitempty"`
	Raw      json.RawMessage    `json:"raw,omitempty"`
	Picture  []byte             `json:"picture,omitempty"`
	Untagged bool
	Skipped  string `json:"-"`
	hidden   string
}

func TestSchemaOfAStruct(t *testing.T) {
	schema, err := llmrelay.SchemaOf[forecastArgs]()
	if err != nil {
		t.Fatal(err)
	}
	var got, want any
	if err := json.Unmarshal(schema, &got); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(`{
		"type": "object",
		"properties": {
			"verbose": {"type": "boolean"},
			"place": {
				"type": "object",
				"properties": {
					"city": {"type": "string", "description": "The city, e.g. Paris"},
					"country": {"type": "string"}
				},
				"required": ["city"],
				"additionalProperties": false
			},
			"days": {"type": "integer", "enum": [1, 3, 7]},
			"unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Which scale"},
			"fields": {"type": "array", "items": {"type": "string"}},
			"start": {"type": "string", "format": "date-time"},
			"extra": {"type": "object", "additionalProperties": {"type": "number"}},
			"raw": {},
			"picture": {"type": "string", "contentEncoding": "base64"},
			"Untagged": {"type": "boolean"}
		},
		"required": ["place", "days", "Untagged"],
		"additionalProperties": false
	}`), &want); err != nil {
		t.Fatal(err)
	}
	gotText, _ := json.MarshalIndent(got, "", "  ")
	wantText, _ := json.MarshalIndent(want, "", "  ")
	if string(gotText) != string(wantText) {
		t.Errorf("schema\n%s\nwant\n%s", gotText, wantText)
	}
}

type node struct {
	Children []node `json:"children"`
}

type badEnum struct {
	Days int `json:"days" enum:"1,three"`
}

type withChannel struct {
	Done chan bool `json:"done"`
}

type intKeys struct {
	Counts map[int]string `json:"counts"`
}

func TestSchemaOfRefusesWhatItCannotDescribe(t *testing.T) {
	cases := []struct {
		name string
		get  func() (json.RawMessage, error)
		want string
	}{
		{"not a struct", llmrelay.SchemaOf[string], "a struct, not a string"},
		{"recursive", llmrelay.SchemaOf[node], "refers to itself"},
		{"bad enum", llmrelay.SchemaOf[badEnum], `enum value "three" is not a int`},
		{"channel", llmrelay.SchemaOf[withChannel], "has no JSON form"},
		{"int keys", llmrelay.SchemaOf[intKeys], "only maps with string keys"},
		{"encodes itself", llmrelay.SchemaOf[struct {
			At json.Number `json:"at"`
			T  time.Duration
			R  jsonSelf `json:"r"`
		}], "encodes itself"},
	}
	for _, c := range cases {
		_, err := c.get()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one that says %q", c.name, err, c.want)
		}
	}
}

// jsonSelf encodes itself, so its type says nothing of its JSON.
type jsonSelf struct{}

func (jsonSelf) MarshalJSON() ([]byte, error) { return []byte(`"self"`), nil }

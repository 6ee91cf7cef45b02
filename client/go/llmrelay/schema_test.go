package llmrelay_test

// Unit tests of SchemaOf: the JSON Schema of a tool's arguments, read from a struct. No server.

import (
	"encoding/json"
	"regexp"
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

// quotedArgs have fields with the ,string option, which encoding/json reads from a JSON string holding the value's
// JSON ("12", not 12) where it applies (a bool or a number, or a pointer to one), and ignores elsewhere.
type quotedArgs struct {
	Count   int      `json:"count,string" description:"How many"`
	Limit   *uint8   `json:"limit,omitempty,string"`
	Ratio   float64  `json:"ratio,string" enum:"0.5,1.50"`
	Strict  bool     `json:"strict,string"`
	Tags    []string `json:"tags,string"`
	Corners [2]int   `json:"corners,omitempty"`
	Grid    [3][2]bool
}

func TestSchemaOfQuotedFieldsAndArrays(t *testing.T) {
	schema, err := llmrelay.SchemaOf[quotedArgs]()
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
			"count": {"type": "string", "pattern": "^-?[0-9]+$", "description": "How many"},
			"limit": {"type": "string", "pattern": "^[0-9]+$"},
			"ratio": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+)?$", "enum": ["0.5", "1.5"]},
			"strict": {"type": "string", "enum": ["true", "false"]},
			"tags": {"type": "array", "items": {"type": "string"}},
			"corners": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
			"Grid": {
				"type": "array",
				"items": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
				"minItems": 3,
				"maxItems": 3
			}
		},
		"required": ["count", "ratio", "strict", "tags", "Grid"],
		"additionalProperties": false
	}`), &want); err != nil {
		t.Fatal(err)
	}
	gotText, _ := json.MarshalIndent(got, "", "  ")
	wantText, _ := json.MarshalIndent(want, "", "  ")
	if string(gotText) != string(wantText) {
		t.Errorf("schema\n%s\nwant\n%s", gotText, wantText)
	}

	// What a model that follows the schema writes, encoding/json decodes.
	var args quotedArgs
	written := `{"count": "12", "limit": "7", "ratio": "1.5", "strict": "true", "tags": ["a"], "corners": [1, 2],
		"Grid": [[true, false], [false, false], [true, true]]}`
	if err := json.Unmarshal([]byte(written), &args); err != nil {
		t.Fatalf("%s, written to the schema, does not decode: %v", written, err)
	}
	if args.Count != 12 || *args.Limit != 7 || args.Ratio != 1.5 || !args.Strict || args.Grid[2][1] != true {
		t.Errorf("decoded %+v", args)
	}
	properties := got.(map[string]any)["properties"].(map[string]any)
	for name, value := range map[string]string{"count": "-12", "limit": "255", "ratio": "-1.5e3"} {
		pattern := properties[name].(map[string]any)["pattern"].(string)
		if !regexp.MustCompile(pattern).MatchString(value) {
			t.Errorf("%s: %q, which encoding/json takes, does not match the pattern %s", name, value, pattern)
		}
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
		// A JSON string holding a quoted JSON string ("\"Paris\""): a model writes "Paris", refused every time.
		{"quoted string", llmrelay.SchemaOf[struct {
			City string `json:"city,string"`
		}], "the ,string option makes string a JSON string holding a quoted JSON string"},
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

// selfEmbedding embeds itself, which encoding/json lifts once: its JSON is {"x": ...}.
type selfEmbedding struct {
	*selfEmbedding
	X int `json:"x"`
}

func TestSchemaOfAStructThatEmbedsItself(t *testing.T) {
	schema, err := llmrelay.SchemaOf[selfEmbedding]()
	if err != nil {
		t.Fatal(err)
	}
	want := `{"additionalProperties":false,"properties":{"x":{"type":"integer"}},"required":["x"],"type":"object"}`
	if string(schema) != want {
		t.Errorf("schema %s, want %s", schema, want)
	}
}

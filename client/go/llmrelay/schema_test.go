package llmrelay_test

// Unit tests of SchemaOf: the JSON Schema of a tool's arguments, read from a struct. No server.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
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

// Types that refer to themselves through a map, a slice, an array or a pointer, not a struct: SchemaOf followed them
// until the stack overflowed (a fatal error, not a panic), or, for a pointer to itself, forever.
type (
	tree      map[string]tree
	list      []list
	ring      [2]*ring
	loop      *loop
	indirects *[]indirects
)

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
		{"recursive map", llmrelay.SchemaOf[struct {
			T tree `json:"t"`
		}], "field T: llmrelay_test.tree refers to itself: give the tool's schema explicitly (NewRawTool)"},
		{"recursive slice", llmrelay.SchemaOf[struct{ L []list }], "llmrelay_test.list refers to itself"},
		{"recursive array", llmrelay.SchemaOf[struct{ R ring }], "llmrelay_test.ring refers to itself"},
		{"pointer to itself", llmrelay.SchemaOf[struct{ P *loop }], "llmrelay_test.loop refers to itself"},
		{"pointer to a slice of itself", llmrelay.SchemaOf[struct{ I indirects }],
			"llmrelay_test.indirects refers to itself"},
		{"bad enum", llmrelay.SchemaOf[badEnum], `enum value "three" is not a int`},
		{"channel", llmrelay.SchemaOf[withChannel], "has no JSON form"},
		{"int keys", llmrelay.SchemaOf[intKeys], "only maps with string keys"},
		// A JSON string holding a quoted JSON string ("\"Paris\""): a model writes "Paris", refused every time.
		{"quoted string", llmrelay.SchemaOf[struct {
			City string `json:"city,string"`
		}], "the ,string option makes string a JSON string holding a quoted JSON string"},
		// Read from a JSON string (UnmarshalText), which would then hold a quoted one, as for a string.
		{"quoted text", llmrelay.SchemaOf[struct {
			Level level `json:"level,string"`
		}], "the ,string option makes llmrelay_test.level a JSON string holding a quoted JSON string"},
		{"text enum", llmrelay.SchemaOf[struct {
			Level level `json:"level" enum:"low,middling"`
		}], `enum value "middling" is not a llmrelay_test.level`},
		{"encodes itself", llmrelay.SchemaOf[struct {
			At json.Number `json:"at"`
			T  time.Duration
			R  jsonSelf `json:"r"`
		}], "encodes itself"},
		// Text as well, but encoding/json writes it as MarshalJSON says (its time.Time is a date-time string).
		{"encodes itself as text too", llmrelay.SchemaOf[struct {
			Text jsonText `json:"text"`
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

// jsonText encodes itself, and reads itself from text too.
type jsonText struct{ jsonSelf }

func (*jsonText) UnmarshalText([]byte) error { return nil }

// level is an integer that encoding/json reads from its name, a JSON string (UnmarshalText), and writes as one.
type level int

func (l level) MarshalText() ([]byte, error) { return []byte([]string{"low", "high"}[l]), nil }

func (l *level) UnmarshalText(text []byte) error {
	switch string(text) {
	case "low":
		*l = 0
	case "high":
		*l = 1
	default:
		return fmt.Errorf("there is no level %q", text)
	}
	return nil
}

// textArgs have fields of types that encoding/json reads from a JSON string through their UnmarshalText, whatever
// their kind: a struct (netip.Addr), an integer (level), and these behind a pointer, in a slice or in a map.
type textArgs struct {
	Addr   netip.Addr       `json:"addr" description:"The address"`
	Level  level            `json:"level" enum:"low,high"`
	Via    *netip.Prefix    `json:"via,omitempty"`
	Levels []level          `json:"levels,omitempty"`
	Named  map[string]level `json:"named,omitempty"`
	At     time.Time        `json:"at,omitzero"` // text too, but a date-time string
}

func TestSchemaOfTextTypes(t *testing.T) {
	schema, err := llmrelay.SchemaOf[textArgs]()
	if err != nil {
		t.Fatal(err)
	}
	want := `{"additionalProperties":false,"properties":{` +
		`"addr":{"description":"The address","type":"string"},` +
		`"at":{"format":"date-time","type":"string"},` +
		`"level":{"enum":["low","high"],"type":"string"},` +
		`"levels":{"items":{"type":"string"},"type":"array"},` +
		`"named":{"additionalProperties":{"type":"string"},"type":"object"},` +
		`"via":{"type":"string"}` +
		`},"required":["addr","level"],"type":"object"}`
	if string(schema) != want {
		t.Errorf("schema\n%s\nwant\n%s", schema, want)
	}
	// What a model that follows the schema writes, encoding/json decodes.
	var args textArgs
	written := `{"addr": "10.0.0.1", "level": "high", "via": "10.0.0.0/8", "levels": ["low"], "named": {"a": "high"},
		"at": "2024-01-02T03:04:05Z"}`
	if err := json.Unmarshal([]byte(written), &args); err != nil {
		t.Fatalf("%s, written to the schema, does not decode: %v", written, err)
	}
	if args.Addr != netip.MustParseAddr("10.0.0.1") || args.Level != 1 || args.Via.Bits() != 8 || args.Named["a"] != 1 {
		t.Errorf("decoded %+v", args)
	}
}

// Fields of one JSON name, which encoding/json reads into one field of them, or none.
type (
	shadowArgs struct {
		ID int `json:"id"` // shallower than shadowLabels.ID: it is the id
		shadowLabels
		shadowTitle
		shadowCount
		wrapA
		wrapB
		*hidden             // encoding/json cannot allocate an embedded pointer to an unexported struct: not read
		inner   `json:"in"` // tagged: a property, though its type is unexported
	}
	shadowLabels struct {
		ID    string `json:"id" description:"Loses to shadowArgs.ID"`
		Name  string // untagged: loses to shadowTitle's tagged "Name" at the same depth
		Both  string // untagged, as is shadowCount's at the same depth: neither is read
		Label string `json:"label"`
	}
	shadowTitle struct {
		Title string `json:"Name"`
	}
	shadowCount struct {
		Both  string
		Count int `json:"count"`
	}
	// Lifted through wrapA and wrapB alike, at the same depth: neither twice.Deep is read.
	wrapA struct{ twice }
	wrapB struct{ twice }
	twice struct {
		Deep int `json:"deep"`
	}
	hidden struct {
		Secret string `json:"secret"`
	}
	inner struct{ X int }
)

func TestSchemaOfFieldsOfOneName(t *testing.T) {
	schema, err := llmrelay.SchemaOf[shadowArgs]()
	if err != nil {
		t.Fatal(err)
	}
	want := `{"additionalProperties":false,"properties":{` +
		`"Name":{"type":"string"},` +
		`"count":{"type":"integer"},` +
		`"id":{"type":"integer"},` +
		`"in":{"additionalProperties":false,"properties":{"X":{"type":"integer"}},"required":["X"],"type":"object"},` +
		`"label":{"type":"string"}` +
		`},"required":["id","label","Name","count","in"],"type":"object"}`
	if string(schema) != want {
		t.Errorf("schema\n%s\nwant\n%s", schema, want)
	}
	// The schema says what encoding/json reads: all of it, and none of what it leaves out.
	decode := func(arguments string) error {
		decoder := json.NewDecoder(bytes.NewReader([]byte(arguments)))
		decoder.DisallowUnknownFields()
		var args shadowArgs
		return decoder.Decode(&args)
	}
	written := `{"id": 5, "label": "l", "Name": "n", "count": 2, "in": {"X": 1}}`
	if err := decode(written); err != nil {
		t.Fatalf("%s, written to the schema, does not decode: %v", written, err)
	}
	for _, left := range []string{`{"Both": "b"}`, `{"deep": 1}`, `{"secret": "s"}`} {
		if err := decode(left); err == nil {
			t.Errorf("encoding/json reads %s, which the schema leaves out", left)
		}
	}
}

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

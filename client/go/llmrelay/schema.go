package llmrelay

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"time"
)

// SchemaOf is the JSON Schema of the JSON that encoding/json decodes into a value of type T, a struct: an object with
// a property per field under its json name (fields tagged json:"-" and unexported ones left out), required unless
// tagged omitempty (or omitzero), and no other properties. Two more tags describe a field to the model:
// `description:"..."`, and `enum:"a,b,c"` for the values it may take (each read as the field's type reads JSON, a
// string as it is). Field types map as encoding/json encodes them: strings, booleans, integers, numbers, arrays
// ([]byte: a base64 string; a fixed-size array with exactly its length of items), maps with string keys, nested and
// embedded structs, pointers as what they point to, time.Time as a date-time string, and json.RawMessage or
// interfaces as any JSON value. A boolean or number field with the ,string option is a string holding its JSON
// ("12", "true"), as encoding/json then reads it; a string field with it is refused (a quoted JSON string in a
// string, which no model writes).
//
//	type Weather struct {
//		City string `json:"city" description:"The city, e.g. Paris"`
//		Unit string `json:"unit,omitempty" enum:"celsius,fahrenheit"`
//	}
//	schema, err := llmrelay.SchemaOf[Weather]()
func SchemaOf[T any]() (json.RawMessage, error) {
	t := reflect.TypeFor[T]()
	schema, _, err := structSchemaFor(t)
	if err != nil {
		return nil, fmt.Errorf("llmrelay: the schema of %s: %w", t, err)
	}
	return schema, nil
}

// structSchemaFor is the schema of the struct type t as JSON text, and the shape that arguments must have to meet it
// where encoding/json would not check.
func structSchemaFor(t reflect.Type) (json.RawMessage, *shape, error) {
	if t.Kind() != reflect.Struct {
		return nil, nil, fmt.Errorf("a tool's arguments are a JSON object, so a struct, not a %s", t.Kind())
	}
	schema, err := structSchema(t, map[reflect.Type]bool{})
	if err != nil {
		return nil, nil, err
	}
	text, err := json.Marshal(schema)
	return text, shapeOf(t), err // shapeOf after structSchema, which refuses a recursive t
}

var (
	timeType       = reflect.TypeFor[time.Time]()
	rawMessageType = reflect.TypeFor[json.RawMessage]()
	marshalerType  = reflect.TypeFor[json.Marshaler]()
)

// schemaOf is the schema of t; visiting holds the structs being described, to refuse a recursive type.
func schemaOf(t reflect.Type, visiting map[reflect.Type]bool) (map[string]any, error) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch {
	case t == timeType:
		return map[string]any{"type": "string", "format": "date-time"}, nil
	case t == rawMessageType || t.Kind() == reflect.Interface:
		return map[string]any{}, nil
	case t.Implements(marshalerType) || reflect.PointerTo(t).Implements(marshalerType):
		return nil, fmt.Errorf("%s encodes itself (json.Marshaler), so its schema cannot be read from its type: "+
			"give the tool's schema explicitly (NewRawTool)", t)
	}
	switch t.Kind() {
	case reflect.String:
		return map[string]any{"type": "string"}, nil
	case reflect.Bool:
		return map[string]any{"type": "boolean"}, nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return map[string]any{"type": "integer"}, nil
	case reflect.Float32, reflect.Float64:
		return map[string]any{"type": "number"}, nil
	case reflect.Slice, reflect.Array:
		if t.Elem().Kind() == reflect.Uint8 && t.Kind() == reflect.Slice {
			return map[string]any{"type": "string", "contentEncoding": "base64"}, nil
		}
		items, err := schemaOf(t.Elem(), visiting)
		if err != nil {
			return nil, err
		}
		if t.Kind() == reflect.Array {
			// encoding/json fills an array from as many items as it has and drops the rest: exactly its length.
			return map[string]any{"type": "array", "items": items, "minItems": t.Len(), "maxItems": t.Len()}, nil
		}
		return map[string]any{"type": "array", "items": items}, nil
	case reflect.Map:
		if t.Key().Kind() != reflect.String {
			return nil, fmt.Errorf("%s: only maps with string keys are JSON objects", t)
		}
		values, err := schemaOf(t.Elem(), visiting)
		if err != nil {
			return nil, err
		}
		return map[string]any{"type": "object", "additionalProperties": values}, nil
	case reflect.Struct:
		return structSchema(t, visiting)
	}
	return nil, fmt.Errorf("%s (a %s) has no JSON form", t, t.Kind())
}

// structSchema is the schema of a struct: its fields as properties, embedded structs' fields among them.
func structSchema(t reflect.Type, visiting map[reflect.Type]bool) (map[string]any, error) {
	if visiting[t] {
		return nil, fmt.Errorf("%s refers to itself: give the tool's schema explicitly (NewRawTool)", t)
	}
	visiting[t] = true
	defer delete(visiting, t)
	properties := map[string]any{}
	required := []string{}
	if err := addFields(t, properties, &required, visiting); err != nil {
		return nil, err
	}
	return map[string]any{
		"type":                 "object",
		"properties":           properties,
		"required":             required,
		"additionalProperties": false,
	}, nil
}

// addFields adds t's fields to properties and the names of those without omitempty to required.
func addFields(t reflect.Type, properties map[string]any, required *[]string, visiting map[reflect.Type]bool) error {
	for _, f := range jsonFields(t) {
		field := f.field
		property, err := schemaOf(field.Type, visiting)
		if err != nil {
			return fmt.Errorf("field %s: %w", field.Name, err)
		}
		quoted := f.quoted()
		if quoted != nil {
			// encoding/json then takes only a JSON string holding the value's JSON ("12", "true"), so the schema
			// says so: the type the value has would have the model write what never decodes.
			if property, err = quotedSchema(quoted); err != nil {
				return fmt.Errorf("field %s: %w", field.Name, err)
			}
		}
		if description := field.Tag.Get("description"); description != "" {
			property["description"] = description
		}
		if enum, ok := field.Tag.Lookup("enum"); ok {
			values, err := enumValues(f.valueType(), enum, quoted != nil)
			if err != nil {
				return fmt.Errorf("field %s: %w", field.Name, err)
			}
			property["enum"] = values
		}
		properties[f.name] = property
		if f.required() {
			*required = append(*required, f.name)
		}
	}
	return nil
}

// jsonField is a property of a struct's JSON object: a field under its json name.
type jsonField struct {
	name    string
	field   reflect.StructField
	options []string // the json tag's options after the name: omitempty, omitzero, string
}

// jsonFields are the properties of t's JSON object as encoding/json reads them: its exported fields not tagged
// json:"-", and an embedded struct's fields among them (encoding/json lifts them into the outer object). The schema
// and the check of the arguments (shapeOf) both read them here, so the two never disagree.
func jsonFields(t reflect.Type) []jsonField {
	return liftedFields(t, map[reflect.Type]bool{})
}

// liftedFields are jsonFields of t, lifting holding the embedded structs whose fields are being lifted: a struct that
// embeds itself (through a pointer) gives its fields once, as encoding/json reads them.
func liftedFields(t reflect.Type, lifting map[reflect.Type]bool) []jsonField {
	lifting[t] = true
	defer delete(lifting, t)
	var fields []jsonField
	for i := range t.NumField() {
		field := t.Field(i)
		tag := field.Tag.Get("json")
		if tag == "-" {
			continue
		}
		name, flags, _ := strings.Cut(tag, ",")
		fieldType := field.Type
		for fieldType.Kind() == reflect.Pointer {
			fieldType = fieldType.Elem()
		}
		if field.Anonymous && name == "" && fieldType.Kind() == reflect.Struct {
			if !lifting[fieldType] {
				fields = append(fields, liftedFields(fieldType, lifting)...)
			}
			continue
		}
		if !field.IsExported() {
			continue
		}
		if name == "" {
			name = field.Name
		}
		fields = append(fields, jsonField{name: name, field: field, options: strings.Split(flags, ",")})
	}
	return fields
}

// required is whether the schema requires the property: unless it is tagged omitempty or omitzero.
func (f jsonField) required() bool {
	return !slices.Contains(f.options, "omitempty") && !slices.Contains(f.options, "omitzero")
}

// valueType is the field's type without its pointers: the type its JSON value is read as.
func (f jsonField) valueType() reflect.Type {
	t := f.field.Type
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t
}

// quoted is the type whose JSON the field's JSON string holds when the ,string option applies to it, else nil.
// encoding/json applies it to a bool, a number or a string, or an unnamed pointer to one (one pointer only), and
// ignores it on any other field.
func (f jsonField) quoted() reflect.Type {
	if !slices.Contains(f.options, "string") {
		return nil
	}
	t := f.field.Type
	if t.Kind() == reflect.Pointer && t.Name() == "" {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64,
		reflect.Float32, reflect.Float64, reflect.String:
		return t
	}
	return nil
}

// quotedSchema is the schema of a field whose value encoding/json reads from a JSON string (the ,string option):
// a string holding the JSON of t, a bool or a number, in the form encoding/json writes it.
func quotedSchema(t reflect.Type) (map[string]any, error) {
	switch t.Kind() {
	case reflect.Bool:
		return map[string]any{"type": "string", "enum": []string{"true", "false"}}, nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return map[string]any{"type": "string", "pattern": `^-?[0-9]+$`}, nil
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return map[string]any{"type": "string", "pattern": `^[0-9]+$`}, nil
	case reflect.Float32, reflect.Float64:
		return map[string]any{"type": "string", "pattern": `^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$`}, nil
	}
	// A string with ,string is a JSON string holding a quoted JSON string ("\"Paris\""): a model told it is a
	// string writes "Paris", which encoding/json refuses every time.
	return nil, fmt.Errorf("the ,string option makes %s a JSON string holding a quoted JSON string, which a model "+
		"does not write: drop the option, or give the tool's schema explicitly (NewRawTool)", t)
}

// enumValues reads an enum tag's comma-separated values as the field's type reads JSON (strings as they are); for a
// field with the ,string option, each is then the JSON text encoding/json writes of it, as a string ("7", "true").
func enumValues(t reflect.Type, tag string, quoted bool) ([]any, error) {
	var values []any
	for _, text := range strings.Split(tag, ",") {
		if t.Kind() == reflect.String {
			values = append(values, text)
			continue
		}
		value := reflect.New(t)
		if err := json.Unmarshal([]byte(text), value.Interface()); err != nil {
			return nil, fmt.Errorf("enum value %q is not a %s: %w", text, t, err)
		}
		if !quoted {
			values = append(values, value.Elem().Interface())
			continue
		}
		written, err := json.Marshal(value.Elem().Interface())
		if err != nil {
			return nil, fmt.Errorf("enum value %q: %w", text, err)
		}
		values = append(values, string(written))
	}
	return values, nil
}

// shape is what the schema of a type asks of its JSON, which a tool's arguments are checked for (check) before they
// reach its handler, every problem at once, with its path, as the Python and TypeScript SDKs say them: each value's
// JSON type, every object's required properties at any depth and no others (encoding/json leaves a missing one, or a
// null one, zero, and stops at the first problem it meets), a fixed-size array's length (it fills the array from fewer
// items and drops the extra ones), and no null for an item or a map's value that cannot be null (it makes the zero
// value of it, whose required properties are then missing unseen).
type shape struct {
	// kind is the JSON value's: reflect.Struct for an object with properties, Slice or Array for an array, Map for an
	// object of values; any other kind has nothing to check inside.
	kind reflect.Kind
	// json is the JSON type the value must be, as a problem names it ("an integer"); "" for any (an interface's,
	// json.RawMessage's).
	json string
	// nullable is whether null is a value of the type: a pointer's, an interface's or json.RawMessage's; anything
	// else holds nothing that null could mean.
	nullable bool
	// properties are a struct's (kind Struct).
	properties []propertyShape
	// items is the shape of an array's items or a map's values.
	items *shape
	// length is a fixed-size array's.
	length int
}

// propertyShape is a property of an object's shape.
type propertyShape struct {
	name     string
	required bool
	// quoted is whether the value is a JSON string holding its JSON (the ,string option), where encoding/json reads
	// "null" as null.
	quoted bool
	shape  *shape
}

// shapeOf is the shape of a type that structSchema described (so no recursive one, and none that encodes itself).
func shapeOf(t reflect.Type) *shape {
	s := &shape{}
	for t.Kind() == reflect.Pointer {
		t, s.nullable = t.Elem(), true
	}
	switch {
	case t == rawMessageType || t.Kind() == reflect.Interface:
		s.nullable = true
		return s
	case t == timeType:
		s.json = "a string"
		return s
	}
	switch t.Kind() {
	case reflect.String:
		s.json = "a string"
	case reflect.Bool:
		s.json = "a boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		s.json = "an integer"
	case reflect.Float32, reflect.Float64:
		s.json = "a number"
	case reflect.Struct:
		s.kind, s.json = reflect.Struct, "an object"
		for _, f := range jsonFields(t) {
			s.properties = append(s.properties, propertyShape{name: f.name, required: f.required(),
				quoted: f.quoted() != nil, shape: shapeOf(f.field.Type)})
		}
	case reflect.Slice, reflect.Array:
		if t.Kind() == reflect.Slice && t.Elem().Kind() == reflect.Uint8 {
			s.json = "a string" // base64 text
			return s
		}
		s.kind, s.json, s.items = t.Kind(), "an array", shapeOf(t.Elem())
		if t.Kind() == reflect.Array {
			s.length = t.Len()
		}
	case reflect.Map:
		s.kind, s.json, s.items = reflect.Map, "an object", shapeOf(t.Elem())
	}
	return s
}

// check says everything in value, the JSON at path (a property's name, dotted within objects, with [i] for an
// array's items; "" for the arguments), that falls short of the shape: nil, or an error of every problem.
func (s *shape) check(value json.RawMessage, path string) error {
	var problems []string
	s.problems(value, path, &problems)
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// problems adds what in value, the JSON at path, falls short of the shape to problems.
func (s *shape) problems(value json.RawMessage, path string, problems *[]string) {
	if s.json != "" {
		got := jsonType(value)
		if s.json == "an integer" && got == "a number" && bytes.ContainsAny(value, ".eE") {
			got = string(bytes.TrimSpace(value)) // 1.5, or 3.0, which encoding/json decodes into no int either
		} else if s.json == "an integer" && got == "a number" {
			got = s.json
		}
		if got != s.json {
			*problems = append(*problems, at(path, fmt.Sprintf("expected %s, got %s", s.json, got)))
			return
		}
	}
	switch s.kind {
	case reflect.Struct:
		var object map[string]json.RawMessage
		if json.Unmarshal(value, &object) != nil {
			return
		}
		names := make([]string, len(s.properties))
		for i, property := range s.properties {
			names[i] = property.name
			named := joinPath(path, property.name)
			value, present := object[property.name]
			null := present && (isNull(value) || property.quoted && string(bytes.TrimSpace(value)) == `"null"`)
			switch {
			case property.required && !present:
				*problems = append(*problems, fmt.Sprintf("the required property %q is missing", named))
			case property.required && null && !property.shape.nullable:
				*problems = append(*problems, fmt.Sprintf("the required property %q is missing (it is null)", named))
			case present && !null && !property.quoted: // a quoted value is JSON in a string: the decoder reads it
				property.shape.problems(value, named, problems)
			}
		}
		known := "it takes none"
		if len(names) > 0 {
			known = "the properties are: " + strings.Join(names, ", ")
		}
		for _, key := range slices.Sorted(maps.Keys(object)) {
			if !slices.Contains(names, key) {
				*problems = append(*problems, at(path, fmt.Sprintf("there is no property %q (%s)", key, known)))
			}
		}
	case reflect.Slice, reflect.Array:
		var items []json.RawMessage
		if json.Unmarshal(value, &items) != nil {
			return
		}
		if s.kind == reflect.Array && len(items) != s.length {
			*problems = append(*problems, fmt.Sprintf("the property %q takes exactly %d items, not %d", path, s.length,
				len(items)))
			return
		}
		for i, item := range items {
			s.items.itemProblems(item, fmt.Sprintf("%s[%d]", path, i), problems)
		}
	case reflect.Map:
		var values map[string]json.RawMessage
		if json.Unmarshal(value, &values) != nil {
			return
		}
		for _, key := range slices.Sorted(maps.Keys(values)) {
			s.items.itemProblems(values[key], joinPath(path, key), problems)
		}
	}
}

// itemProblems checks an array's item or a map's value, which has no name to be required under: null is refused
// where the shape cannot be null.
func (s *shape) itemProblems(value json.RawMessage, path string, problems *[]string) {
	if isNull(value) {
		if !s.nullable {
			*problems = append(*problems, fmt.Sprintf("%q is null, which the schema does not allow", path))
		}
		return
	}
	s.problems(value, path, problems)
}

// jsonType is the JSON type of a value, as a problem names it.
func jsonType(value json.RawMessage) string {
	text := bytes.TrimSpace(value)
	if len(text) == 0 {
		return "nothing"
	}
	switch text[0] {
	case '{':
		return "an object"
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	}
	return "a number"
}

// at is a problem at a path, or the bare problem at the top (the other SDKs' words).
func at(path, problem string) string {
	if path == "" {
		return problem
	}
	return path + ": " + problem
}

func joinPath(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func isNull(value json.RawMessage) bool {
	return string(bytes.TrimSpace(value)) == "null"
}

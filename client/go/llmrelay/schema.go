package llmrelay

import (
	"encoding/json"
	"fmt"
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
// ([]byte: a base64 string), maps with string keys, nested and embedded structs, pointers as what they point to,
// time.Time as a date-time string, and json.RawMessage or interfaces as any JSON value.
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

// structSchemaFor is the schema of the struct type t as JSON text, and the names of its required properties.
func structSchemaFor(t reflect.Type) (json.RawMessage, []string, error) {
	if t.Kind() != reflect.Struct {
		return nil, nil, fmt.Errorf("a tool's arguments are a JSON object, so a struct, not a %s", t.Kind())
	}
	schema, err := structSchema(t, map[reflect.Type]bool{})
	if err != nil {
		return nil, nil, err
	}
	text, err := json.Marshal(schema)
	return text, schema["required"].([]string), err
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
			// encoding/json lifts an embedded struct's fields into the outer object.
			if err := addFields(fieldType, properties, required, visiting); err != nil {
				return err
			}
			continue
		}
		if !field.IsExported() {
			continue
		}
		if name == "" {
			name = field.Name
		}
		property, err := schemaOf(field.Type, visiting)
		if err != nil {
			return fmt.Errorf("field %s: %w", field.Name, err)
		}
		if description := field.Tag.Get("description"); description != "" {
			property["description"] = description
		}
		if enum, ok := field.Tag.Lookup("enum"); ok {
			values, err := enumValues(fieldType, enum)
			if err != nil {
				return fmt.Errorf("field %s: %w", field.Name, err)
			}
			property["enum"] = values
		}
		properties[name] = property
		options := strings.Split(flags, ",")
		if !slices.Contains(options, "omitempty") && !slices.Contains(options, "omitzero") {
			*required = append(*required, name)
		}
	}
	return nil
}

// enumValues reads an enum tag's comma-separated values as the field's type reads JSON (strings as they are).
func enumValues(t reflect.Type, tag string) ([]any, error) {
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
		values = append(values, value.Elem().Interface())
	}
	return values, nil
}

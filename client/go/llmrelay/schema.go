package llmrelay

import (
	"bytes"
	"cmp"
	"encoding"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/big"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// SchemaOf is the JSON Schema of the JSON that encoding/json decodes into a value of type T, a struct: an object with
// a property per field under its json name (fields tagged json:"-" and unexported ones left out), required unless
// tagged omitempty (or omitzero), and no other properties. Two more tags describe a field to the model:
// `description:"..."`, and `enum:"a,b,c"` for the values it may take (each read as the field's type reads JSON, a
// string as it is). Field types map as encoding/json encodes them: strings, booleans, integers, numbers, arrays
// ([]byte: a base64 string; a fixed-size array with exactly its length of items), maps with string keys, nested and
// embedded structs, pointers as what they point to, time.Time as a date-time string, a type that reads itself from
// text (an encoding.TextUnmarshaler, not a json.Unmarshaler: netip.Addr, an enum of names) as a string, and
// json.RawMessage or interfaces as any JSON value. A boolean or number field with the ,string option is a string
// holding its JSON ("12", "true"), as encoding/json then reads it; a string field with it is refused (a quoted JSON
// string in a string, which no model writes), and so is a text one. Of fields of one json name (an embedded struct's
// and another's), the property is the one encoding/json reads: the least deeply embedded, then a tagged one before
// an untagged one; where two are alike, neither is a property, nor is a field of an embedded pointer to an unexported
// struct (encoding/json cannot set it). A type that encodes itself (json.Marshaler) or refers to itself (type Tree
// map[string]Tree) is an error: give such a tool's schema explicitly (NewRawTool).
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
	schema, err := structSchema(t, map[reflect.Type]bool{t: true})
	if err != nil {
		return nil, nil, err
	}
	text, err := json.Marshal(schema)
	return text, shapeOf(t), err // shapeOf after structSchema, which refuses a recursive t
}

var (
	timeType            = reflect.TypeFor[time.Time]()
	rawMessageType      = reflect.TypeFor[json.RawMessage]()
	marshalerType       = reflect.TypeFor[json.Marshaler]()
	unmarshalerType     = reflect.TypeFor[json.Unmarshaler]()
	textUnmarshalerType = reflect.TypeFor[encoding.TextUnmarshaler]()
)

// schemaOf is the schema of t; visiting holds the named types being described (t's parents), to refuse one that
// refers to itself, which would be described forever: a struct through a field, and a map, a slice, an array or a
// pointer through what it holds (type Tree map[string]Tree, type P *P). A type can only refer to itself by name, so
// the named ones are enough.
func schemaOf(t reflect.Type, visiting map[reflect.Type]bool) (map[string]any, error) {
	if t.Name() != "" {
		if visiting[t] {
			return nil, fmt.Errorf("%s refers to itself: give the tool's schema explicitly (NewRawTool)", t)
		}
		visiting[t] = true
		defer delete(visiting, t)
	}
	switch {
	case t.Kind() == reflect.Pointer:
		return schemaOf(t.Elem(), visiting) // as what it points to
	case t == timeType:
		return map[string]any{"type": "string", "format": "date-time"}, nil
	case t == rawMessageType || t.Kind() == reflect.Interface:
		return map[string]any{}, nil
	case t.Implements(marshalerType) || reflect.PointerTo(t).Implements(marshalerType):
		return nil, fmt.Errorf("%s encodes itself (json.Marshaler), so its schema cannot be read from its type: "+
			"give the tool's schema explicitly (NewRawTool)", t)
	case isText(t):
		return map[string]any{"type": "string"}, nil
	}
	switch t.Kind() {
	case reflect.String:
		return map[string]any{"type": "string"}, nil
	case reflect.Bool:
		return map[string]any{"type": "boolean"}, nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		schema := map[string]any{"type": "integer"}
		// The range of a type of 32 bits or fewer, which a model may well reach (an int8's 127); a 64-bit one's
		// bounds are past what JSON numbers hold exactly, and past what a model writes. Its arguments are checked
		// against the type's range all the same (shape).
		lowest, highest := integerRange(t)
		if lowest.Sign() == 0 || t.Bits() <= 32 {
			schema["minimum"] = lowest.Int64()
		}
		if t.Bits() <= 32 {
			schema["maximum"] = highest.Int64()
		}
		return schema, nil
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

// isText is whether encoding/json reads a value of t from a JSON string, through its UnmarshalText (netip.Addr, an
// enum that reads its names): t or *t is an encoding.TextUnmarshaler, and not a json.Unmarshaler, which encoding/json
// asks first.
func isText(t reflect.Type) bool {
	implements := func(iface reflect.Type) bool {
		return t.Implements(iface) || reflect.PointerTo(t).Implements(iface)
	}
	return implements(textUnmarshalerType) && !implements(unmarshalerType)
}

// structSchema is the schema of a struct, which visiting holds: its fields as properties, embedded structs' fields
// among them.
func structSchema(t reflect.Type, visiting map[reflect.Type]bool) (map[string]any, error) {
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
// json:"-", and an embedded struct's fields among them (encoding/json lifts them into the outer object), in the order
// of the fields. The schema and the check of the arguments (shapeOf) both read them here, so the two never disagree,
// nor with the decoder: of fields of one name, encoding/json reads the one that a shallower embedding lifts, a tagged
// one before an untagged one at the same depth, and none where two are alike (its typeFields and dominantField);
// so a property is listed once, as the field it goes into, or not at all.
func jsonFields(t reflect.Type) []jsonField {
	var candidates []liftedField
	level := []embedded{{t: t, settable: true}}
	// The structs already lifted: one embedded again deeper (or in itself) has only fields that lose to its own.
	seen := map[reflect.Type]bool{}
	for depth := 0; len(level) > 0; depth++ {
		times := map[reflect.Type]int{}
		for _, e := range level {
			times[e.t]++
		}
		var next []embedded
		for _, e := range level {
			if seen[e.t] {
				continue
			}
			seen[e.t] = true
			for i := range e.t.NumField() {
				field, settable := e.t.Field(i), e.settable
				tag := field.Tag.Get("json")
				if tag == "-" || !jsonVisible(field) {
					continue
				}
				name, flags, _ := strings.Cut(tag, ",")
				if !validName(name) {
					name = "" // encoding/json reads the field as untagged
				}
				index := append(slices.Clone(e.index), i)
				// encoding/json cannot allocate an embedded pointer to an unexported struct (it says "cannot set
				// embedded pointer to unexported struct", or panics for a tagged one): what it holds is never read.
				if field.Anonymous && !field.IsExported() && field.Type.Kind() == reflect.Pointer {
					settable = false
				}
				held := field.Type // what the field holds, through a pointer
				if held.Kind() == reflect.Pointer && held.Name() == "" {
					held = held.Elem()
				}
				if field.Anonymous && name == "" && held.Kind() == reflect.Struct {
					next = append(next, embedded{t: held, index: index, settable: settable})
					continue
				}
				candidate := liftedField{jsonField: jsonField{name: name, field: field,
					options: strings.Split(flags, ",")}, depth: depth, tagged: name != "", index: index,
					settable: settable}
				if name == "" {
					candidate.name = field.Name
				}
				candidates = append(candidates, candidate)
				if times[e.t] > 1 {
					// The struct is embedded twice at this depth: each of its fields is there twice, alike, and
					// encoding/json reads neither.
					candidates = append(candidates, candidate)
				}
			}
		}
		level = next
	}
	byName := map[string][]liftedField{}
	for _, c := range candidates {
		byName[c.name] = append(byName[c.name], c)
	}
	var fields []liftedField
	for _, named := range byName {
		if field, ok := dominant(named); ok && field.settable {
			fields = append(fields, field)
		}
	}
	slices.SortFunc(fields, func(a, b liftedField) int { return slices.Compare(a.index, b.index) })
	properties := make([]jsonField, len(fields))
	for i, f := range fields {
		properties[i] = f.jsonField
	}
	return properties
}

// embedded is a struct whose fields jsonFields lifts: index is the path of fields to it (reflect's FieldByIndex),
// settable whether encoding/json can reach it to set its fields.
type embedded struct {
	t        reflect.Type
	index    []int
	settable bool
}

// liftedField is a field that may be a property, before encoding/json's choice between the fields of one name.
type liftedField struct {
	jsonField
	depth    int   // how many embedded structs it is lifted out of
	tagged   bool  // whether its name is its json tag's
	index    []int // its path from the outer struct, which orders the properties as the fields
	settable bool
}

// dominant is the field that encoding/json reads a property into, of the fields of its name: the shallowest, or the
// one of the shallowest that is tagged; none (false) where two of those are alike.
func dominant(fields []liftedField) (liftedField, bool) {
	slices.SortStableFunc(fields, func(a, b liftedField) int {
		if c := cmp.Compare(a.depth, b.depth); c != 0 || a.tagged == b.tagged {
			return c
		}
		if a.tagged {
			return -1
		}
		return 1
	})
	if len(fields) > 1 && fields[0].depth == fields[1].depth && fields[0].tagged == fields[1].tagged {
		return liftedField{}, false
	}
	return fields[0], true
}

// jsonVisible is whether encoding/json reads a field at all: an exported one, or an embedded struct (through a
// pointer or not), whose exported fields it lifts even when the struct's type is unexported.
func jsonVisible(field reflect.StructField) bool {
	if field.IsExported() {
		return true
	}
	t := field.Type
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return field.Anonymous && t.Kind() == reflect.Struct
}

// validName is whether encoding/json takes a json tag's name as the property's (its isValidTag): letters, digits,
// spaces and punctuation but for a quote and a backslash; for any other, it names the property as the field.
func validName(name string) bool {
	if name == "" {
		return false
	}
	for _, c := range name {
		if !strings.ContainsRune("!#$%&()*+-./:;<=>?@[]^_{|}~ ", c) && !unicode.IsLetter(c) && !unicode.IsDigit(c) {
			return false
		}
	}
	return true
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
	if isText(t) {
		// Its value is a JSON string (read through UnmarshalText) whatever its kind: as a string's, below.
		return nil, quotedStringError(t)
	}
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
	return nil, quotedStringError(t)
}

// quotedStringError refuses the ,string option on a field whose value is a JSON string: it is then a JSON string
// holding a quoted JSON string ("\"Paris\""), and a model told it is a string writes "Paris", which encoding/json
// refuses every time.
func quotedStringError(t reflect.Type) error {
	return fmt.Errorf("the ,string option makes %s a JSON string holding a quoted JSON string, which a model "+
		"does not write: drop the option, or give the tool's schema explicitly (NewRawTool)", t)
}

// enumValues reads an enum tag's comma-separated values as the field's type reads JSON (strings as they are, and
// those of a type read from a JSON string through UnmarshalText, which must take them); for a field with the ,string
// option, each is then the JSON text encoding/json writes of it, as a string ("7", "true").
func enumValues(t reflect.Type, tag string, quoted bool) ([]any, error) {
	var values []any
	for _, text := range strings.Split(tag, ",") {
		if t.Kind() == reflect.String && !isText(t) {
			values = append(values, text)
			continue
		}
		value, read := reflect.New(t), []byte(text)
		if isText(t) {
			read, _ = json.Marshal(text) // a JSON string, which encoding/json hands to UnmarshalText
		}
		if err := json.Unmarshal(read, value.Interface()); err != nil {
			return nil, fmt.Errorf("enum value %q is not a %s: %w", text, t, err)
		}
		if isText(t) {
			values = append(values, text)
			continue
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
// null one, zero, and stops at the first problem it meets), a value its enum tag lists, an integer within its type's
// range (encoding/json names the Go type, which the model does not know), a fixed-size array's length
// (it fills the array from fewer items and drops the extra ones), and no null for an item or a map's value that
// cannot be null (it makes the zero value of it, whose required properties are then missing unseen).
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
	// lowest and highest are the range of an integer's type (its json "an integer"), which encoding/json refuses
	// a number past in its own words, naming the Go type.
	lowest, highest *big.Float
}

// propertyShape is a property of an object's shape.
type propertyShape struct {
	name     string
	required bool
	// quoted is whether the value is a JSON string holding its JSON (the ,string option), where encoding/json reads
	// "null" as null.
	quoted bool
	shape  *shape
	// enum is what the enum tag allows (nil without the tag).
	enum *enumShape
}

// enumShape is the values a property's enum tag allows.
type enumShape struct {
	// allowed is each one's JSON in canonicalJSON's form (for a quoted property, of the JSON its string holds).
	allowed []string
	// listed is them as the schema lists them, for a problem to name.
	listed string
}

// shapeOf is the shape of a type that structSchema described: no recursive one (schemaOf refuses it before shapeOf
// could follow it forever), and none that encodes itself; a type is of the same case as in schemaOf.
func shapeOf(t reflect.Type) *shape {
	s := &shape{}
	for t.Kind() == reflect.Pointer {
		t, s.nullable = t.Elem(), true
	}
	switch {
	case t == rawMessageType || t.Kind() == reflect.Interface:
		s.nullable = true
		return s
	case t == timeType || isText(t):
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
		lowest, highest := integerRange(t)
		s.json, s.lowest, s.highest = "an integer", new(big.Float).SetInt(lowest), new(big.Float).SetInt(highest)
	case reflect.Float32, reflect.Float64:
		s.json = "a number"
	case reflect.Struct:
		s.kind, s.json = reflect.Struct, "an object"
		for _, f := range jsonFields(t) {
			s.properties = append(s.properties, propertyShape{name: f.name, required: f.required(),
				quoted: f.quoted() != nil, shape: shapeOf(f.field.Type), enum: enumOf(f)})
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
		if s.json == "an integer" && got == "a number" {
			got = s.json
			if _, whole := wholeNumber(value); !whole {
				got = string(bytes.TrimSpace(value)) // 1.5
			}
		}
		if got != s.json {
			*problems = append(*problems, at(path, fmt.Sprintf("expected %s, got %s", s.json, got)))
			return
		}
		if s.lowest != nil && !s.holds(value) {
			*problems = append(*problems, at(path, fmt.Sprintf("expected an integer from %s to %s, got %s",
				s.lowest.Text('f', 0), s.highest.Text('f', 0), bytes.TrimSpace(value))))
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
			// Said of the object, at its path, as the Python and TypeScript SDKs say it (inner: the required
			// property "x" is missing).
			case property.required && !present:
				*problems = append(*problems, at(path, fmt.Sprintf("the required property %q is missing",
					property.name)))
			case property.required && null && !property.shape.nullable:
				*problems = append(*problems, at(path, fmt.Sprintf("the required property %q is missing (it is null)",
					property.name)))
			case present && !null:
				found := len(*problems)
				if !property.quoted { // a quoted value is JSON in a string: the decoder reads it
					property.shape.problems(value, named, problems)
				}
				if property.enum != nil && len(*problems) == found {
					property.enum.problems(value, property.quoted, named, problems)
				}
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

// enumOf is what a field's enum tag allows; nil without the tag. addFields has read the tag already, refusing a value
// the field's type does not take.
func enumOf(f jsonField) *enumShape {
	tag, ok := f.field.Tag.Lookup("enum")
	if !ok {
		return nil
	}
	quoted := f.quoted() != nil
	values, err := enumValues(f.valueType(), tag, quoted)
	if err != nil {
		return nil
	}
	e := &enumShape{}
	listed := make([]string, len(values))
	for i, value := range values {
		written, _ := json.Marshal(value)
		listed[i] = string(written)
		if quoted {
			written = []byte(value.(string)) // the JSON text the string holds
		}
		e.allowed = append(e.allowed, canonicalJSON(written))
	}
	e.listed = strings.Join(listed, ", ")
	return e
}

// problems adds a problem where value, of the property at path, is none of the values allowed: as encoding/json
// reads it, so 1.50 is 1.5 (and for a quoted property, "1.50" is "1.5").
func (e *enumShape) problems(value json.RawMessage, quoted bool, path string, problems *[]string) {
	read := value
	if quoted {
		var text string
		if json.Unmarshal(value, &text) == nil {
			read = []byte(text)
		}
	}
	if !slices.Contains(e.allowed, canonicalJSON(read)) {
		*problems = append(*problems, at(path, fmt.Sprintf("expected one of %s, got %s", e.listed, shownValue(value))))
	}
}

// canonicalJSON is a JSON value as json.Marshal writes what json.Unmarshal reads of it: one text for every way of
// writing the same value (1.50 and 1.5, "\u0041" and "A").
func canonicalJSON(value json.RawMessage) string {
	var read any
	if json.Unmarshal(value, &read) != nil {
		return string(value)
	}
	written, _ := json.Marshal(read)
	return string(written)
}

// shownValue is a value as a problem shows it: a string, a number or a boolean itself, anything else by its JSON type.
func shownValue(value json.RawMessage) string {
	switch kind := jsonType(value); kind {
	case "a string", "a number", "a boolean":
		return canonicalJSON(value)
	default:
		return kind
	}
}

// holds is whether value, a whole JSON number, is within the integer's range; compared as floats of 256 bits, as
// wholeNumber reads them (1e999999999 is not written out).
func (s *shape) holds(value json.RawMessage) bool {
	number, _, err := big.ParseFloat(string(bytes.TrimSpace(value)), 10, 256, big.ToNearestEven)
	return err == nil && number.Cmp(s.lowest) >= 0 && number.Cmp(s.highest) <= 0
}

// integerRange is the lowest and highest value of an integer type.
func integerRange(t reflect.Type) (*big.Int, *big.Int) {
	bits := uint(t.Bits())
	one := big.NewInt(1)
	switch t.Kind() {
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return new(big.Int), new(big.Int).Sub(new(big.Int).Lsh(one, bits), one)
	default:
		highest := new(big.Int).Sub(new(big.Int).Lsh(one, bits-1), one)
		return new(big.Int).Neg(new(big.Int).Add(highest, one)), highest
	}
}

// wholeNumber is whether value, a JSON number, is a whole one (3, 3.0, 1e2, as the Python and TypeScript SDKs take
// an integer, and JSON Schema's "integer"), and, where it is written with a fraction or an exponent that
// encoding/json refuses for an integer's field, the same number as an integer's text (nil where it needs no
// rewriting, or is past 64 bits, which the decoder then refuses).
func wholeNumber(value json.RawMessage) (json.RawMessage, bool) {
	text := string(bytes.TrimSpace(value))
	if !strings.ContainsAny(text, ".eE") {
		return nil, true
	}
	// At 256 bits, a fraction within some 70 digits of the number shows (3.000...01 is no whole number); the exponent
	// is applied at that precision, not written out (1e999999999 takes no gigabyte).
	number, _, err := big.ParseFloat(text, 10, 256, big.ToNearestEven)
	if err != nil || !number.IsInt() {
		return nil, false
	}
	if whole, accuracy := number.Int64(); accuracy == big.Exact {
		return json.RawMessage(strconv.FormatInt(whole, 10)), true
	}
	if whole, accuracy := number.Uint64(); accuracy == big.Exact {
		return json.RawMessage(strconv.FormatUint(whole, 10)), true
	}
	return nil, true
}

// wholeNumbers is value, which check has passed, with every whole number at an integer's place written as an
// integer (wholeNumber), for encoding/json to decode; nil where nothing needs rewriting.
func (s *shape) wholeNumbers(value json.RawMessage) json.RawMessage {
	if s.json == "an integer" {
		rewritten, _ := wholeNumber(value)
		return rewritten
	}
	switch s.kind {
	case reflect.Struct, reflect.Map:
		var object map[string]json.RawMessage
		if json.Unmarshal(value, &object) != nil {
			return nil
		}
		changed := false
		for key, item := range object {
			itemShape := s.items
			if s.kind == reflect.Struct {
				i := slices.IndexFunc(s.properties, func(p propertyShape) bool { return p.name == key })
				if itemShape = nil; i >= 0 && !s.properties[i].quoted { // a quoted value is JSON in a string
					itemShape = s.properties[i].shape
				}
			}
			if itemShape != nil && !isNull(item) {
				if rewritten := itemShape.wholeNumbers(item); rewritten != nil {
					object[key], changed = rewritten, true
				}
			}
		}
		if changed {
			return marshalled(object)
		}
	case reflect.Slice, reflect.Array:
		var items []json.RawMessage
		if json.Unmarshal(value, &items) != nil {
			return nil
		}
		changed := false
		for i, item := range items {
			if !isNull(item) {
				if rewritten := s.items.wholeNumbers(item); rewritten != nil {
					items[i], changed = rewritten, true
				}
			}
		}
		if changed {
			return marshalled(items)
		}
	}
	return nil
}

func marshalled(value any) json.RawMessage {
	text, err := json.Marshal(value)
	if err != nil {
		return nil
	}
	return text
}

// itemProblems checks an array's item or a map's value, which has no name to be required under: null is refused
// where the shape cannot be null, in the other SDKs' words ("via[1]: expected an object, got null").
func (s *shape) itemProblems(value json.RawMessage, path string, problems *[]string) {
	if isNull(value) {
		if !s.nullable {
			*problems = append(*problems, at(path, fmt.Sprintf("expected %s, got null", cmp.Or(s.json, "a value"))))
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

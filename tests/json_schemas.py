"""Varied JSON schemas for structured-output tests: types, nesting, enums, bounds, patterns, optional fields.

Strings and arrays are bounded, so that a small model at temperature 0.7 finishes within a few dozen tokens.
"""

NAME = {"type": "string", "minLength": 1, "maxLength": 12}

SCHEMAS: dict[str, dict] = {
    "person": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"]},
    "boolean_flag": {"type": "object", "properties": {"enabled": {"type": "boolean"}}, "required": ["enabled"]},
    "enum_color": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                   "required": ["color"]},
    "bare_enum": {"enum": ["yes", "no", 1, None]},
    "number_range": {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}},
                     "required": ["score"]},
    "integer_list": {"type": "array", "items": {"type": "integer", "minimum": -99, "maximum": 99},
                     "minItems": 1, "maxItems": 4},
    "string_list": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 3},
    "nested_object": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                  "handle": NAME}, "required": ["id", "handle"]}},
        "required": ["user"]},
    "list_of_objects": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
    "optional_field": {"type": "object", "properties": {"title": NAME, "subtitle": NAME}, "required": ["title"]},
    "pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"]},
    "const": {"type": "object", "properties": {"kind": {"const": "event"}, "n": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 9}},
              "required": ["kind", "n"]},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                                                    {"type": "boolean"}]}},
               "required": ["value"]},
    "nullable": {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 10}},
                 "required": ["note"]},
    "definitions_ref": {"type": "object", "$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"]}}, "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"]},
    "tuple_like": {"type": "array", "prefixItems": [NAME, {"type": "integer", "minimum": 0, "maximum": 9}],
                   "items": False, "minItems": 2},
    "date_format": {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]},
    "many_fields": {"type": "object", "properties": {
        "a": {"type": "boolean"}, "b": {"type": "integer", "minimum": 0, "maximum": 9}, "c": {"enum": ["x", "y"]},
        "d": {"type": "null"}, "e": NAME}, "required": ["a", "b", "c", "d", "e"]},
    "unique_small_ints": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 3},
    "empty_object": {"type": "object", "properties": {}, "additionalProperties": False},
    "string_root": {"type": "string", "minLength": 2, "maxLength": 8},
    "recipe": {"type": "object", "properties": {
        "dish": NAME, "vegetarian": {"type": "boolean"},
        "steps": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 2}},
        "required": ["dish", "vegetarian", "steps"]},
}

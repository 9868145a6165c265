"""JSON schemas of the kinds agents send: nested objects, arrays, enums, bounded numbers,
optional fields, anyOf, string patterns."""

OBJECT = "object"

SCHEMAS: dict[str, dict] = {
    "flat": {
        "type": OBJECT,
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
    "closed": {
        "type": OBJECT,
        "properties": {"query": {"type": "string", "maxLength": 12}},
        "required": ["query"],
        "additionalProperties": False,
    },
    "enum": {
        "type": OBJECT,
        "properties": {"unit": {"enum": ["celsius", "fahrenheit", "kelvin"]}},
        "required": ["unit"],
        "additionalProperties": False,
    },
    "const_and_bool": {
        "type": OBJECT,
        "properties": {"version": {"const": 2}, "dry_run": {"type": "boolean"}},
        "required": ["version", "dry_run"],
    },
    "bounded_integers": {
        "type": OBJECT,
        "properties": {
            "page": {"type": "integer", "minimum": 1, "maximum": 50},
            "offset": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 7},
        },
        "required": ["page", "offset"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": OBJECT,
        "properties": {
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "score": {"type": "number", "minimum": -1.5, "maximum": 1.5},
        },
        "required": ["temperature"],
    },
    "optional_fields": {
        "type": OBJECT,
        "properties": {
            "path": {"type": "string"},
            "start_line": {"type": "integer", "minimum": 1},
            "end_line": {"type": "integer", "minimum": 1},
            "encoding": {"type": "string", "enum": ["utf-8", "latin-1"]},
        },
        "required": ["path"],
        "additionalProperties": False,
    },
    "string_array": {
        "type": OBJECT,
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
        "required": ["tags"],
    },
    "array_bounds": {
        "type": OBJECT,
        "properties": {
            "values": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}
        },
        "required": ["values"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": OBJECT,
        "properties": {
            "user": {
                "type": OBJECT,
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "age": {"type": "integer", "minimum": 0, "maximum": 150},
                    "address": {
                        "type": OBJECT,
                        "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                        "required": ["zip"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["user"],
    },
    "array_of_objects": {
        "type": OBJECT,
        "properties": {
            "points": {
                "type": "array",
                "items": {
                    "type": OBJECT,
                    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                    "required": ["x", "y"],
                    "additionalProperties": False,
                },
                "maxItems": 3,
            }
        },
        "required": ["points"],
    },
    "any_of": {
        "type": OBJECT,
        "properties": {
            "target": {
                "anyOf": [
                    {"type": "string", "maxLength": 8},
                    {"type": "integer", "minimum": 0},
                    {"type": "null"},
                ]
            }
        },
        "required": ["target"],
    },
    "any_of_objects": {
        "type": OBJECT,
        "properties": {
            "shape": {
                "anyOf": [
                    {
                        "type": OBJECT,
                        "properties": {
                            "kind": {"const": "circle"},
                            "r": {"type": "number", "minimum": 0},
                        },
                        "required": ["kind", "r"],
                        "additionalProperties": False,
                    },
                    {
                        "type": OBJECT,
                        "properties": {"kind": {"const": "square"}, "side": {"type": "integer"}},
                        "required": ["kind", "side"],
                        "additionalProperties": False,
                    },
                ]
            }
        },
        "required": ["shape"],
    },
    "pattern": {
        "type": OBJECT,
        "properties": {
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "ticket": {"type": "string", "pattern": "^[A-Z]{2,4}-[0-9]+$"},
        },
        "required": ["date", "ticket"],
        "additionalProperties": False,
    },
    "string_lengths": {
        "type": OBJECT,
        "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 5}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "nullable": {
        "type": OBJECT,
        "properties": {
            "note": {"type": ["string", "null"]},
            "count": {"type": ["integer", "null"]},
        },
        "required": ["note", "count"],
        "additionalProperties": False,
    },
    "refs": {
        "type": OBJECT,
        "$defs": {
            "step": {
                "type": OBJECT,
                "properties": {
                    "tool": {"enum": ["read", "write", "run"]},
                    "arg": {"type": "string"},
                },
                "required": ["tool"],
                "additionalProperties": False,
            }
        },
        "properties": {"plan": {"type": "array", "items": {"$ref": "#/$defs/step"}, "maxItems": 3}},
        "required": ["plan"],
    },
    "deep_nesting": {
        "type": OBJECT,
        "properties": {
            "a": {
                "type": OBJECT,
                "properties": {
                    "b": {
                        "type": OBJECT,
                        "properties": {
                            "c": {
                                "type": "array",
                                "items": {
                                    "type": "array",
                                    "items": {"type": "boolean"},
                                    "maxItems": 2,
                                },
                                "maxItems": 2,
                            }
                        },
                        "required": ["c"],
                    }
                },
                "required": ["b"],
            }
        },
        "required": ["a"],
    },
    "mixed_enum": {
        "type": OBJECT,
        "properties": {"level": {"enum": [1, 2, "high", None, True]}},
        "required": ["level"],
    },
    "no_properties": {"type": OBJECT},
    "free_map": {
        "type": OBJECT,
        "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
        "maxProperties": 3,
    },
    "agent_step": {
        "type": OBJECT,
        "properties": {
            "thought": {"type": "string", "maxLength": 30},
            "action": {"enum": ["search", "read_file", "finish"]},
            "action_input": {
                "type": OBJECT,
                "properties": {
                    "query": {"type": "string"},
                    "top_k": {"type": "integer", "minimum": 1, "maximum": 10},
                },
            },
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["thought", "action", "action_input"],
        "additionalProperties": False,
    },
    "all_of": {
        "type": OBJECT,
        "allOf": [
            {"properties": {"id": {"type": "integer", "minimum": 0}}, "required": ["id"]},
            {"properties": {"label": {"type": "string", "maxLength": 6}}, "required": ["label"]},
        ],
    },
}

# A schema finite in every direction (bounded strings, numbers, arrays, no extra keys):
# any walk through it ends, so a random-weight model completes it within a few hundred tokens.
FINITE_SCHEMA = {
    "type": OBJECT,
    "properties": {
        "action": {"enum": ["search", "read_file", "finish"]},
        "page": {"type": "integer", "minimum": 1, "maximum": 20},
        "query": {"type": "string", "maxLength": 10},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["action", "page", "query", "flags"],
    "additionalProperties": False,
}

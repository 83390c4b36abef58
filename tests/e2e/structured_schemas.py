"""32 JSON schemas of different shapes for the structured-output tests (strings bounded, so that
every output ends within max_tokens whatever a small model prefers to write; numbers are
bounded integers: a "number" may grow digits for ever)."""

from __future__ import annotations

S = {"type": "string", "maxLength": 12}
NAME = {"type": "string", "minLength": 1, "maxLength": 16}
INT = {"type": "integer", "minimum": -999, "maximum": 999}


def obj(props: dict, required: list[str] | None = None, **kw) -> dict:
    """A closed object; every property required unless `required` says otherwise."""
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
        **kw,
    }


SCHEMAS: list[tuple[str, dict]] = [
    ("a person", obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("a city", obj({"city": NAME, "country": NAME, "population": INT})),
    ("a yes/no answer", obj({"answer": {"type": "boolean"}})),
    ("a colour", obj({"colour": {"enum": ["red", "green", "blue"]}})),
    ("a temperature", obj({"celsius": {"type": "integer", "minimum": -50, "maximum": 60}})),
    (
        "a list of fruits",
        obj({"fruits": {"type": "array", "items": S, "minItems": 2, "maxItems": 4}}),
    ),
    (
        "three numbers",
        obj(
            {
                "values": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "minItems": 3,
                    "maxItems": 3,
                }
            }
        ),
    ),  # fmt: skip
    (
        "a book",
        obj(
            {
                "title": NAME,
                "author": NAME,
                "year": {"type": "integer", "minimum": 1000, "maximum": 2030},
            },
            required=["title", "author"],
        ),
    ),  # fmt: skip
    ("an address", obj({"street": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    ("a point", obj({"x": INT, "y": INT})),
    (
        "a nested user",
        obj({"user": obj({"name": NAME, "email": {"type": "string", "maxLength": 24}})}),
    ),
    ("a deep record", obj({"a": obj({"b": obj({"c": {"type": "integer", "maximum": 99}})})})),
    (
        "a movie with tags",
        obj(
            {
                "title": NAME,
                "tags": {"type": "array", "items": {"enum": ["fun", "sad", "long"]}, "maxItems": 3},
            }
        ),
    ),  # fmt: skip
    (
        "a rating",
        obj(
            {"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "comment": S},
            required=["stars"],
        ),
    ),  # fmt: skip
    (
        "a status",
        obj(
            {"status": {"const": "ok"}, "code": {"type": "integer", "minimum": 100, "maximum": 599}}
        ),
    ),  # fmt: skip
    ("an optional note", obj({"note": S, "urgent": {"type": "boolean"}}, required=[])),
    ("a nullable value", obj({"value": {"anyOf": [INT, {"type": "null"}]}})),
    ("an id or a name", obj({"key": {"anyOf": [INT, NAME]}})),
    (
        "a team",
        obj(
            {
                "members": {
                    "type": "array",
                    "items": obj({"name": NAME, "role": {"enum": ["dev", "ops"]}}),
                    "minItems": 1,
                    "maxItems": 2,
                }
            }
        ),
    ),  # fmt: skip
    (
        "a price",
        obj(
            {
                "amount": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000},
                "currency": {"enum": ["EUR", "USD"]},
            }
        ),
    ),  # fmt: skip
    (
        "a matrix",
        obj(
            {
                "rows": {
                    "type": "array",
                    "items": {
                        "type": "array",
                        "items": {"type": "integer", "maximum": 9},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                    "minItems": 2,
                    "maxItems": 2,
                }
            }
        ),
    ),  # fmt: skip
    (
        "a tree via $ref",
        {
            "$defs": {"leaf": obj({"label": S, "weight": {"type": "integer", "maximum": 9}})},
            **obj({"root": {"$ref": "#/$defs/leaf"}}),
        },
    ),  # fmt: skip
    (
        "two $ref fields",
        {
            "$defs": {"p": obj({"x": {"type": "integer", "maximum": 99}})},
            **obj({"start": {"$ref": "#/$defs/p"}, "end": {"$ref": "#/$defs/p"}}),
        },
    ),  # fmt: skip
    (
        "an event",
        obj(
            {
                "name": NAME,
                "day": {"enum": ["mon", "tue", "wed"]},
                "hours": {"type": "integer", "minimum": 1, "maximum": 8},
            }
        ),
    ),  # fmt: skip
    (
        "a top-level array",
        {
            "type": "array",
            "items": obj({"n": {"type": "integer", "maximum": 9}}),
            "minItems": 1,
            "maxItems": 3,
        },
    ),  # fmt: skip
    (
        "a flag set",
        obj({"a": {"type": "boolean"}, "b": {"type": "boolean"}, "c": {"type": "boolean"}}),
    ),
    ("a percentage", obj({"pct": {"type": "integer", "minimum": 0, "maximum": 100}})),
    ("a short word", obj({"word": {"type": "string", "minLength": 2, "maxLength": 8}})),
    (
        "a coded item",
        obj(
            {
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 50},
            }
        ),
    ),  # fmt: skip
    (
        "a pet",
        obj(
            {
                "kind": {"enum": ["cat", "dog"]},
                "name": NAME,
                "age": {"type": "integer", "maximum": 30},
                "vaccinated": {"type": "boolean"},
            },
            required=["kind", "name"],
        ),
    ),  # fmt: skip
    (
        "a mixed list",
        obj(
            {
                "items": {
                    "type": "array",
                    "items": {"anyOf": [{"type": "integer", "maximum": 99}, {"type": "boolean"}]},
                    "maxItems": 4,
                }
            }
        ),
    ),  # fmt: skip
    (
        "a weather report",
        obj(
            {
                "city": NAME,
                "sky": {"enum": ["sunny", "rainy", "cloudy"]},
                "wind": obj(
                    {
                        "kmh": {"type": "integer", "minimum": 0, "maximum": 200},
                        "dir": {"enum": ["N", "E", "S", "W"]},
                    }
                ),
            }
        ),
    ),  # fmt: skip
]

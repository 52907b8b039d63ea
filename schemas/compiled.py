"""A fast validator for the subset of JSON Schema the event schemas use.

The jsonschema package takes about 0.4 ms per event, most of the worker's decode time.
`compile_schema` turns a schema into nested closures once; a property test checks that they
accept exactly the documents jsonschema accepts. A keyword outside the subset raises at
compile time, so a schema change can never be validated silently wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Returns None for a valid value, else a message naming the location.
Check = Callable[[object, str], str | None]

ANNOTATIONS = frozenset({"$schema", "$id", "title", "description", "default", "$defs"})
_TYPES: dict[str, Callable[[object], bool]] = {
    "object": lambda value: isinstance(value, dict),
    "array": lambda value: isinstance(value, list),
    "string": lambda value: isinstance(value, str),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "number": lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
    "boolean": lambda value: isinstance(value, bool),
    "null": lambda value: value is None,
}


def compile_schema(schema: dict, resolve: Callable[[str], dict]) -> Check:
    """Compile `schema`; `resolve(ref)` returns the schema a "$ref" points to."""
    unknown = set(schema) - ANNOTATIONS - _KEYWORDS - {"$ref"}
    if unknown:
        raise ValueError(f"schema keywords {sorted(unknown)} are not supported by schemas.compiled; use the jsonschema validator")
    if "$ref" in schema:
        return compile_schema(resolve(schema["$ref"]), resolve)
    checks = [compiler(schema, resolve) for keywords, compiler in _GROUPS if any(keyword in schema for keyword in keywords)]

    def check(value: object, location: str) -> str | None:
        for part in checks:
            error = part(value, location)
            if error is not None:
                return error
        return None

    return check


def _type(schema: dict, resolve) -> Check:
    names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    tests = [_TYPES[name] for name in names]

    def check(value, location):
        if not any(test(value) for test in tests):
            return f"{location}: {value!r} is not of type {' or '.join(names)}"
        return None

    return check


def _const(schema: dict, resolve) -> Check:
    expected = schema["const"]
    return lambda value, location: None if value == expected and type(value) is type(expected) else f"{location}: {value!r} is not {expected!r}"


def _enum(schema: dict, resolve) -> Check:
    allowed = schema["enum"]
    return lambda value, location: None if any(value == item and type(value) is type(item) for item in allowed) else f"{location}: {value!r} is not one of {allowed!r}"


def _string_length(schema: dict, resolve) -> Check:
    low = schema.get("minLength", 0)
    high = schema.get("maxLength")

    def check(value, location):
        if not isinstance(value, str):
            return None
        # JSON Schema counts code points, as len() on a str does.
        if len(value) < low or (high is not None and len(value) > high):
            return f"{location}: length {len(value)} is outside {low}..{high if high is not None else 'any'}"
        return None

    return check


def _pattern(schema: dict, resolve) -> Check:
    regex = re.compile(schema["pattern"])
    return lambda value, location: None if not isinstance(value, str) or regex.search(value) else f"{location}: {value!r} does not match {schema['pattern']!r}"


def _number_range(schema: dict, resolve) -> Check:
    low, high = schema.get("minimum"), schema.get("maximum")

    def check(value, location):
        if not _TYPES["number"](value):
            return None
        if (low is not None and value < low) or (high is not None and value > high):
            return f"{location}: {value!r} is outside {low}..{high}"
        return None

    return check


def _items(schema: dict, resolve) -> Check:
    item = compile_schema(schema.get("items", {}), resolve)
    low, high = schema.get("minItems", 0), schema.get("maxItems")

    def check(value, location):
        if not isinstance(value, list):
            return None
        if len(value) < low or (high is not None and len(value) > high):
            return f"{location}: {len(value)} items is outside {low}..{high if high is not None else 'any'}"
        for index, element in enumerate(value):
            error = item(element, f"{location}/{index}")
            if error is not None:
                return error
        return None

    return check


def _object(schema: dict, resolve) -> Check:
    properties = {name: compile_schema(sub, resolve) for name, sub in schema.get("properties", {}).items()}
    required = schema.get("required", [])
    closed = schema.get("additionalProperties", True) is False

    def check(value, location):
        if not isinstance(value, dict):
            return None
        for name in required:
            if name not in value:
                return f"{location}: {name!r} is a required property"
        for name, element in value.items():
            sub = properties.get(name)
            if sub is None:
                if closed:
                    return f"{location}: additional property {name!r} is not allowed"
                continue
            error = sub(element, f"{location}/{name}")
            if error is not None:
                return error
        return None

    return check


def _one_of(schema: dict, resolve) -> Check:
    options = [compile_schema(sub, resolve) for sub in schema["oneOf"]]

    def check(value, location):
        matches = sum(option(value, location) is None for option in options)
        return None if matches == 1 else f"{location}: {value!r} matches {matches} of the oneOf options, expected exactly 1"

    return check


# Each compiler handles a group of keywords and runs once when any of them is present.
_GROUPS: tuple[tuple[tuple[str, ...], Callable[[dict, Callable], Check]], ...] = (
    (("type",), _type),
    (("const",), _const),
    (("enum",), _enum),
    (("minLength", "maxLength"), _string_length),
    (("pattern",), _pattern),
    (("minimum", "maximum"), _number_range),
    (("items", "minItems", "maxItems"), _items),
    (("properties", "required", "additionalProperties"), _object),
    (("oneOf",), _one_of),
)
_KEYWORDS = frozenset(keyword for keywords, _ in _GROUPS for keyword in keywords)

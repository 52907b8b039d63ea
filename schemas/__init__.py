"""JSON Schema documents for profilestream's event and profile contracts.

The files beside this module are the single source of truth: producers read them, the
worker validates every record against them, and the README documents them.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from .compiled import Check, compile_schema

EVENT_SCHEMAS = ("post.v1", "like.v1", "follow.v1", "user_deleted.v1")
ALL_SCHEMAS = (*EVENT_SCHEMAS, "profile.v1")


def load(name: str) -> dict:
    """Load the schema document `name` (for example "post.v1")."""
    if name not in ALL_SCHEMAS:
        raise KeyError(f"unknown schema {name!r}; known schemas: {', '.join(ALL_SCHEMAS)}")
    text = resources.files(__package__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def _registry() -> Registry:
    documents = [load(name) for name in ALL_SCHEMAS]
    return Registry().with_resources(
        (document["$id"], Resource.from_contents(document)) for document in documents
    )


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """Return a cached validator for schema `name`, with cross-schema references resolved."""
    return Draft202012Validator(
        load(name),
        registry=_registry(),
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


@functools.cache
def fast_validator(name: str) -> Check:
    """Return the compiled validator of event schema `name`: `check(document, "") -> error or None`.

    It accepts exactly what `validator(name)` accepts (a property test checks this), about
    twenty times faster. Timestamp formats are checked by the caller.
    """
    resolver = _registry().resolver(base_uri=load(name)["$id"])

    def resolve(ref: str) -> dict:
        return resolver.lookup(ref).contents

    return compile_schema(load(name), resolve)

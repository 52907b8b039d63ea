"""The OpenAPI 3.1 document of profilestream's HTTP servers, built from the routes an aiohttp app serves.

The read API's limits are defined here, so the document and the handlers in `stream.read_api`
state the same numbers. Every route of a server must have an operation in `OPERATIONS`, or
building the document raises LookupError.
"""

from __future__ import annotations

import copy
import functools
from importlib import metadata

from aiohttp import web

import schemas

# profile.v1 caps user_id at 256 characters, so a longer id can never be stored.
MAX_USER_ID_CHARS = 256
DEFAULT_HISTORY_LIMIT = 20
MAX_HISTORY_LIMIT = 100
# Versions are Postgres bigint values.
MAX_VERSION = 2**63 - 1

CURRENT_PROFILE_PATH = "/users/{user_id}/profile"
PROFILE_HISTORY_PATH = "/users/{user_id}/profiles"
OPENAPI_PATH = "/openapi.json"

_JSON = "application/json"


def _ref(kind: str, name: str) -> dict:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json_response(description: str, schema_name: str) -> dict:
    return {"description": description, "content": {_JSON: {"schema": _ref("schemas", schema_name)}}}


_READ_ERRORS = {
    "400": _ref("responses", "BadRequest"),
    "503": _ref("responses", "StoreUnavailable"),
}

OPERATIONS: dict[tuple[str, str], dict] = {
    ("GET", CURRENT_PROFILE_PATH): {
        "operationId": "getCurrentProfile",
        "summary": "The user's current profile",
        "description": "Returns the highest stored version of the user's profile, from `profiles_current`.",
        "tags": ["profiles"],
        "parameters": [_ref("parameters", "UserId")],
        "responses": {
            "200": _json_response("The current profile.", "Profile"),
            "404": _json_response("No profile is stored for the user.", "Error"),
            **_READ_ERRORS,
        },
    },
    ("GET", PROFILE_HISTORY_PATH): {
        "operationId": "listProfileVersions",
        "summary": "Stored versions of the user's profile, newest first",
        "description": (
            "Returns one page of versions from `profiles_history`, newest first. To read the next page,"
            " pass the response's `next_before_version` as `before_version`. A user without stored"
            " versions gets an empty page. Query parameters other than `limit` and `before_version`"
            " are rejected with status 400."
        ),
        "tags": ["profiles"],
        "parameters": [
            _ref("parameters", "UserId"),
            _ref("parameters", "Limit"),
            _ref("parameters", "BeforeVersion"),
        ],
        "responses": {"200": _json_response("One page of profile versions.", "ProfilePage"), **_READ_ERRORS},
    },
    ("GET", OPENAPI_PATH): {
        "operationId": "getOpenApiDocument",
        "summary": "This OpenAPI document",
        "tags": ["meta"],
        "responses": {
            "200": {
                "description": "The OpenAPI 3.1 document of this server's routes.",
                "content": {_JSON: {"schema": {"type": "object"}}},
            }
        },
    },
    ("GET", "/healthz"): {
        "operationId": "getLiveness",
        "summary": "Liveness: the server's event loop responds",
        "tags": ["operations"],
        "responses": {"200": _json_response("The server is alive.", "Liveness")},
    },
    ("GET", "/readyz"): {
        "operationId": "getReadiness",
        "summary": "Readiness of the stream worker",
        "description": "Ready once input partitions are assigned, table recovery has finished and no partition is stalled.",
        "tags": ["operations"],
        "responses": {
            "200": _json_response("The worker is ready.", "Readiness"),
            "503": _json_response("The worker is not ready; `reasons` lists why.", "Readiness"),
        },
    },
    ("GET", "/metrics"): {
        "operationId": "getMetrics",
        "summary": "Prometheus metrics",
        "description": "Prometheus text format, or OpenMetrics when the Accept header asks for it.",
        "tags": ["operations"],
        "responses": {
            "200": {
                "description": "The metrics of this process.",
                "content": {
                    "text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}},
                    "application/openmetrics-text; version=1.0.0; charset=utf-8": {"schema": {"type": "string"}},
                },
            }
        },
    },
}


@functools.cache
def _profile_schema() -> dict:
    """Return profile.v1 as an OpenAPI schema object. Its relative `$id` would change how references resolve, so it is dropped."""
    schema = copy.deepcopy(schemas.load("profile.v1"))
    schema.pop("$id", None)
    schema.pop("$schema", None)
    return schema


def _components() -> dict:
    string_list = {"type": "array", "items": {"type": "string"}}
    return {
        "schemas": {
            "Profile": _profile_schema(),
            "ProfilePage": {
                "type": "object",
                "additionalProperties": False,
                "required": ["user_id", "profiles", "next_before_version"],
                "properties": {
                    "user_id": {"type": "string"},
                    "profiles": {"type": "array", "maxItems": MAX_HISTORY_LIMIT, "items": _ref("schemas", "Profile")},
                    "next_before_version": {
                        "type": ["integer", "null"],
                        "description": "Pass as `before_version` to read the next page; null on the last page.",
                    },
                },
            },
            "Error": {
                "type": "object",
                "additionalProperties": False,
                "required": ["error", "message"],
                "properties": {
                    "error": {
                        "type": "string",
                        "enum": ["bad_request", "not_found", "store_unavailable"],
                        "description": "Stable error code.",
                    },
                    "message": {"type": "string", "description": "What failed, naming the bad value and the fix."},
                },
            },
            "Liveness": {
                "type": "object",
                "required": ["alive"],
                "properties": {"alive": {"const": True}},
            },
            "Readiness": {
                "type": "object",
                "required": ["ready", "reasons", "assigned_partitions", "stalled_partitions"],
                "properties": {
                    "ready": {"type": "boolean"},
                    "reasons": string_list,
                    "assigned_partitions": string_list,
                    "stalled_partitions": string_list,
                },
            },
        },
        "parameters": {
            "UserId": {
                "name": "user_id",
                "in": "path",
                "required": True,
                "description": (
                    "The user id, percent-encoded as one path segment: `/` as `%2F`, and the ids `.` and `..` as"
                    " `%2E` and `%2E%2E`, because clients remove dot segments from paths. After decoding it must be"
                    f" valid UTF-8 of at most {MAX_USER_ID_CHARS} characters. U+0000 characters are removed, as the"
                    " Postgres sink removes them when it stores a profile."
                ),
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID_CHARS},
            },
            "Limit": {
                "name": "limit",
                "in": "query",
                "required": False,
                "description": "Maximum versions in the page.",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY_LIMIT, "default": DEFAULT_HISTORY_LIMIT},
            },
            "BeforeVersion": {
                "name": "before_version",
                "in": "query",
                "required": False,
                "description": "Return only versions lower than this one.",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_VERSION},
            },
        },
        "responses": {
            "BadRequest": _json_response("A path or query parameter is invalid; the message names it.", "Error"),
            "StoreUnavailable": _json_response("Postgres cannot be reached or timed out; retry later.", "Error"),
        },
    }


def openapi_document(router: web.UrlDispatcher) -> dict:
    """Build the OpenAPI 3.1 document of every route in `router`.

    HEAD routes, which aiohttp adds beside GET routes, are left out. Raises LookupError
    naming a route that has no entry in OPERATIONS.
    """
    paths: dict[str, dict] = {}
    for route in router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource is not None else ""
        operation = OPERATIONS.get((route.method, path))
        if operation is None:
            raise LookupError(f"route {route.method} {path} has no OpenAPI operation; add one to stream.openapi.OPERATIONS")
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "profilestream",
            "version": metadata.version("profilestream"),
            "description": "Profiles that profilestream stored in Postgres, read-only, plus the server's operational endpoints.",
        },
        "paths": dict(sorted(paths.items())),
        "components": _components(),
    }

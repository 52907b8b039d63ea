"""Strict validation of custom resources against the vendored CRD schemas of fixtures/crd-schemas.

The API server's strict field validation (`kubectl apply --validate=strict`) rejects a custom
resource with a field its CRD schema does not declare, where a CRD schema alone, read as JSON
Schema, accepts any field. `strict_schema` closes that gap before jsonschema validates.

NOTE: the CEL rules of `x-kubernetes-validations` and the `format` keyword are not checked.
The one CEL rule of these CRDs, ScaledObject's minReplicaCount <= maxReplicaCount, has its own
test in test_deploy.py.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
from jsonschema import Draft4Validator
from jsonschema.exceptions import ValidationError

SCHEMA_DIR = Path(__file__).resolve().parent / "fixtures" / "crd-schemas"
# (apiVersion, kind) of each custom resource, and the file of its CRD's openAPIV3Schema.
CRD_SCHEMA_FILES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects_v1alpha1.json",
}

# The names Kubernetes accepts for a custom resource (a DNS-1123 subdomain) and a namespace
# (a DNS-1123 label).
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The fields of Kubernetes' ObjectMeta (io.k8s.apimachinery.pkg.apis.meta.v1), which a CRD
# schema leaves as `type: object`. Entries of ownerReferences and managedFields are not checked
# field by field. test_deploy.py compares the field names with kubernetes-validate's schema.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS_LABEL},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "managedFields": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "selfLink": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": "string"},
        "deletionGracePeriodSeconds": {"type": "integer"},
    },
}
# Go's RE2 accepts a flag group such as `(?i)` after `^`, and Python's re only at the start.
LEADING_FLAGS = re.compile(r"^\^(\(\?[a-zA-Z]+\))")


def python_pattern(pattern: str) -> str:
    """Rewrite an RE2 `pattern` of a CRD schema so that Python's re compiles it with the same meaning."""
    return LEADING_FLAGS.sub(r"\1^", pattern)


def strict_schema(schema: dict) -> dict:
    """Return a copy of a CRD's openAPIV3Schema that rejects unknown fields, for Draft4Validator.

    An object schema without `additionalProperties` or `x-kubernetes-preserve-unknown-fields: true`
    gets `additionalProperties: false`, because the API server prunes or, in strict mode, rejects
    the fields such a schema does not declare. `metadata` becomes OBJECT_META.
    """
    strict = _strict_node(copy.deepcopy(schema))
    strict["properties"]["metadata"] = copy.deepcopy(OBJECT_META)
    return strict


def _strict_node(node: dict) -> dict:
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "pattern" in node:
        node["pattern"] = python_pattern(node["pattern"])
    if node.get("x-kubernetes-list-type") == "set":
        node["uniqueItems"] = True

    is_object = node.get("type") == "object" or "properties" in node
    if is_object and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False

    for child in node.get("properties", {}).values():
        _strict_node(child)
    for keyword in ("items", "additionalProperties", "not"):
        if isinstance(node.get(keyword), dict):
            _strict_node(node[keyword])
    for keyword in ("anyOf", "allOf", "oneOf"):
        for child in node.get(keyword, []):
            _strict_node(child)
    return node


def _unique_list_map_keys(validator, keys: list[str], instance: object, schema: dict) -> Iterator[ValidationError]:
    """Reject two entries of an `x-kubernetes-list-type: map` list with the same key fields, as the API server does."""
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    seen = set()
    for index, item in enumerate(instance):
        if not validator.is_type(item, "object"):
            continue
        key = tuple(json.dumps(item.get(name), sort_keys=True) for name in keys)
        if key in seen:
            values = {name: item.get(name) for name in keys}
            yield ValidationError(f"duplicate entry {values} at index {index}: {keys} must be unique")
        seen.add(key)


StrictValidator = jsonschema.validators.extend(Draft4Validator, {"x-kubernetes-list-map-keys": _unique_list_map_keys})


def load_crd_schema(api_version: str, kind: str) -> dict:
    """Load the vendored openAPIV3Schema of a custom resource, unchanged."""
    filename = CRD_SCHEMA_FILES.get((api_version, kind))
    if filename is None:
        raise LookupError(f"no vendored CRD schema for {kind} {api_version}, only for {sorted(CRD_SCHEMA_FILES)}. "
                          "Add it to fetch.py in tests/fixtures/crd-schemas and to CRD_SCHEMA_FILES.")
    return json.loads((SCHEMA_DIR / filename).read_text(encoding="utf-8"))


def strict_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    return StrictValidator(strict_schema(load_crd_schema(api_version, kind)))


def validation_errors(document: dict) -> list[ValidationError]:
    """Validate a custom resource strictly, and return its errors ordered by path."""
    validator = strict_validator(document["apiVersion"], document["kind"])
    return sorted(validator.iter_errors(document), key=lambda error: [str(part) for part in error.absolute_path])

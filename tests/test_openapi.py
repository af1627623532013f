"""The OpenAPI document and the router agree: every served route and method is documented,
nothing else is, and every documented schema is valid JSON Schema (by introspection of the
engine's own route table)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator

import sqlrs_engine as se

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def api() -> se.Api:
    managers: dict[str, Any] = dict.fromkeys(
        ("instance_id", "config", "store", "jobs", "registry", "instances", "deletion", "cache",
         "prepare", "runs", "pool", "remote"))
    return se.Api("test", **managers)


def test_the_document_lists_exactly_the_served_routes(api: se.Api) -> None:
    served = {(route.template, method.lower()) for route in api.routes
              for method in route.operations}
    documented = {(path, method) for path, item in api.document["paths"].items()
                  for method in item}
    assert served == documented
    for route in api.routes:
        for name in re.findall(r"\{(\w+)\}", route.template):
            assert route.pattern.fullmatch(route.template.replace(f"{{{name}}}", "x"))


def test_every_operation_documents_its_answers(api: se.Api) -> None:
    for route in api.routes:
        for method, operation in route.operations.items():
            doc = api.document["paths"][route.template][method.lower()]
            assert doc["summary"] == operation.summary
            assert doc["operationId"] == operation.handler.__name__
            codes = set(doc["responses"])
            assert {str(code) for code in operation.answers} <= codes
            assert ("401" in codes) == route.auth, (route.template, method)
            assert {"403", "405"} <= codes


def test_schemas_are_valid_json_schema(api: se.Api) -> None:
    schemas = api.document["components"]["schemas"]
    assert {"ErrorBody", "InstanceEntry", "StateEntry", "PrepareJobStatus", "DeleteNode",
            "CacheStatus", "RunEvent"} <= set(schemas)
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)
    delete_node = schemas["DeleteNode"]
    assert delete_node["properties"]["children"]["items"] == {
        "$ref": "#/components/schemas/DeleteNode"}
    assert "details" not in schemas["ErrorBody"]["required"]
    assert "additionalProperties" not in schemas["PrepareBody"]  # requests: unknown ignored
    assert schemas["InstanceEntry"]["additionalProperties"] is False


def test_optional_fields_are_omitted_in_answers_and_nullable_in_requests() -> None:
    schemas: dict[str, Any] = {}
    se.json_schema(se.StateEntry, schemas)
    se.json_schema(se.PrepareBody, schemas, request=True)
    parent = schemas["StateEntry"]["properties"]["parent_state_id"]
    assert parent == {"type": "string", "pattern": "^[0-9a-f]{64}$",
                      "description": "Absent for root states."}
    assert {"type": "null"} in schemas["PrepareBody"]["properties"]["stdin"]["anyOf"]

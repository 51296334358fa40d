"""The service's OpenAPI document, made to say what the service answers.

BentoML's generated document declares OpenAPI 3.0.2 but drops the `null` of optional fields
(an optional `probabilities` reads as a plain object, a nullable request field as a plain
number), documents the 400 `detail` as a string where a list of field errors is returned,
and knows nothing of loopline's own answers (413, 415, 503, 504). This rewrites it once per
worker as OpenAPI 3.1, whose schemas are JSON Schema: the request and response bodies come
straight from the pydantic models that validate and build them.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import BaseModel

REF = "#/components/schemas/{model}"

FIELD_ERROR: dict[str, Any] = {
    "type": "object",
    "title": "FieldError",
    "required": ["type", "loc", "msg"],
    "properties": {
        "type": {"type": "string"},
        "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
        "msg": {"type": "string"},
        "url": {"type": "string"},
        "input": {},
        "ctx": {"type": "object"},
    },
}
BAD_REQUEST: dict[str, Any] = {
    "type": "object",
    "title": "BadRequest",
    "required": ["error"],
    "description": "A field that breaks its rule (named in `detail`), a body that is not JSON, or a bad header.",
    "properties": {
        "error": {"type": "string"},
        "detail": {"type": "array", "items": {"$ref": REF.format(model="FieldError")}},
    },
}
ERROR: dict[str, Any] = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
ERROR_STATUSES = {
    "413": "The body is larger than serve.max_body_bytes",
    "415": "The body is not JSON (Content-Type: application/json)",
    "503": "No model to serve: why (tracking store missing or unreadable, no champion, a champion that failed to load)",
    "504": "The answer did not start within serve.request_timeout_s",
}


def _schema_of(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def corrected_spec(
    spec: dict[str, Any],
    routes: dict[str, tuple[type[BaseModel] | None, type[BaseModel]]],
    unavailable_routes: set[str],
) -> dict[str, Any]:
    """`spec` (BentoML's) with `routes` mapped to (request model or None, response model);
    503 is documented on `unavailable_routes` and on /readyz."""
    spec = copy.deepcopy(spec)
    spec["openapi"] = "3.1.0"
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    components.update(FieldError=FIELD_ERROR, BadRequest=BAD_REQUEST, Error=ERROR)
    error = {"$ref": REF.format(model="Error")}
    for path, (request, response) in routes.items():
        operation = spec["paths"][path]["post"]
        if request is not None:
            operation["requestBody"]["content"]["application/json"]["schema"] = _schema_of(request, components)
            operation["requestBody"]["required"] = True
        # BentoML keys its statuses as integers; JSON writes 200 and "200" both as "200", a
        # key given twice that Swagger UI (/docs) refuses to render
        responses = operation["responses"] = {str(k): v for k, v in operation["responses"].items()}
        responses["200"] = _json(_schema_of(response, components), "Successful Response")
        responses["400"] = _json({"$ref": REF.format(model="BadRequest")}, "Bad Request")
        for status, description in ERROR_STATUSES.items():
            if status != "503" or path in unavailable_routes:
                responses[status] = _json(error, description)
    if "/model" in spec["paths"]:  # the status is a read: GET answers it too (POST stays for old clients)
        status = copy.deepcopy(spec["paths"]["/model"]["post"])
        status.pop("requestBody", None)  # a GET takes no body
        status["operationId"] = status.get("operationId", "model") + "__get"
        spec["paths"]["/model"]["get"] = status
    readyz = spec["paths"].get("/readyz", {}).get("get")
    if readyz is not None:
        readyz["responses"] = {str(k): v for k, v in readyz.get("responses", {}).items()}
        readyz["responses"]["503"] = _json(error, ERROR_STATUSES["503"])
    referenced = json.dumps(spec["paths"]) + json.dumps(components)
    for name in [n for n in components if n.endswith("IODescriptor")]:
        if REF.format(model=name) not in referenced:
            del components[name]  # BentoML's renderings of the models, replaced above
    return spec

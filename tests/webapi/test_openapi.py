"""The description is generated from the models that validate requests, and covers every route."""

from openapi_spec_validator import validate

from core.schemas import JobCreate


def test_the_document_is_valid_openapi(client):
    validate(client.get("/openapi.json").get_json())


def test_every_route_is_described_with_its_methods(app, client):
    spec = client.get("/openapi.json").get_json()
    described = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        routes |= {(m, path) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes == described


def test_request_schema_is_the_validating_model(client):
    spec = client.get("/openapi.json").get_json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobCreate"}
    generated = JobCreate.model_json_schema(ref_template="#/components/schemas/{model}")
    generated.pop("$defs", None)
    assert spec["components"]["schemas"]["JobCreate"] == generated


def test_docs_page_renders_the_description(client):
    resp = client.get("/docs")
    assert resp.mimetype == "text/html" and 'fetch("/openapi.json")' in resp.get_data(as_text=True)

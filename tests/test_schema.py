"""GET /api/schema/: an OpenAPI 3 document of the API that validates."""

import pytest
import yaml
from openapi_spec_validator import validate

URL = "/api/schema/"


@pytest.fixture
def schema(db, anonymous_client):
    response = anonymous_client.get(URL, {"format": "json"})
    assert response.status_code == 200
    return response.json()


def test_the_schema_is_a_valid_openapi_3_document(schema):
    validate(schema)

    assert schema["openapi"].startswith("3.")
    assert schema["info"]["title"] == "DirectDriveX API"


def test_the_default_yaml_form_is_the_same_document(db, anonymous_client, schema):
    response = anonymous_client.get(URL)

    assert response.status_code == 200
    assert yaml.safe_load(response.content) == schema


def test_the_schema_describes_every_endpoint_and_its_refusals(schema):
    paths = schema["paths"]

    assert set(paths) >= {"/api/uploads/", "/api/uploads/{upload_id}/", "/api/slots/"}
    assert set(paths["/api/uploads/"]) >= {"get", "post"}
    assert set(paths["/api/uploads/{upload_id}/"]) >= {"get", "delete"}
    assert set(paths["/api/uploads/"]["post"]["responses"]) >= {"201", "400", "401", "413", "429"}
    assert set(paths["/api/uploads/{upload_id}/"]["get"]["responses"]) >= {"200", "404"}
    assert set(paths["/api/slots/"]["get"]["responses"]) >= {"200", "403"}


def test_the_schema_declares_the_upload_request_and_error_shapes(schema):
    components = schema["components"]["schemas"]

    create = components["UploadCreate"]
    assert set(create["required"]) == {"filename", "size"}
    assert create["properties"]["size"] == {
        "type": "integer",
        "format": "int64",
        "description": "Exact size of the file in bytes, at least 1.",
    }
    assert set(components["Error"]["required"]) >= {"code", "detail"}
    statuses = next(p for p in schema["paths"]["/api/uploads/"]["get"]["parameters"] if p["name"] == "status")
    assert set(statuses["schema"]["enum"]) == {"uploading", "complete", "failed", "cancelled", "expired"}


def test_the_schema_declares_token_and_session_auth(schema):
    schemes = schema["components"]["securitySchemes"]

    assert schemes["tokenAuth"]["type"] == "apiKey"
    assert schemes["tokenAuth"]["name"] == "Authorization"
    assert schemes["cookieAuth"]["in"] == "cookie"

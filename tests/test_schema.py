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


REFUSALS = {
    ("/api/uploads/", "get"): {"400", "401", "503"},
    ("/api/uploads/", "post"): {"400", "401", "403", "413", "415", "429", "503"},
    ("/api/uploads/{upload_id}/", "get"): {"401", "404", "503"},
    ("/api/uploads/{upload_id}/", "delete"): {"401", "403", "404", "503"},
    ("/api/slots/", "get"): {"401", "403", "503"},
    ("/api/uploads/{upload_id}/content", "get"): {"401", "404", "409", "416", "429", "503"},
    ("/api/uploads/{upload_id}/shares/", "get"): {"401", "404", "503"},
    ("/api/uploads/{upload_id}/shares/", "post"): {"400", "401", "403", "404", "409", "415", "503"},
    ("/api/shares/{share_id}/", "delete"): {"401", "403", "404", "503"},
}
SUCCESS = {
    ("/api/uploads/", "get"): {"200"},
    ("/api/uploads/", "post"): {"201"},
    ("/api/uploads/{upload_id}/", "get"): {"200"},
    ("/api/uploads/{upload_id}/", "delete"): {"204"},
    ("/api/slots/", "get"): {"200"},
    ("/api/uploads/{upload_id}/content", "get"): {"200", "206", "304"},
    ("/api/uploads/{upload_id}/shares/", "get"): {"200"},
    ("/api/uploads/{upload_id}/shares/", "post"): {"201"},
    ("/api/shares/{share_id}/", "delete"): {"204"},
}
CONTENT = "/api/uploads/{upload_id}/content"
ERROR_REF = {"$ref": "#/components/schemas/Error"}


def parameter(operation: dict, name: str) -> dict:
    return next(p for p in operation["parameters"] if p["name"] == name)


def test_the_schema_describes_every_endpoint_with_exactly_its_answers_and_the_error_body(schema):
    paths = schema["paths"]

    assert {(path, method) for path, methods in paths.items() for method in methods} == set(REFUSALS)
    for (path, method), refusals in REFUSALS.items():
        responses = paths[path][method]["responses"]
        assert set(responses) == refusals | SUCCESS[path, method], (path, method)
        for status in refusals:
            assert responses[status]["content"]["application/json"]["schema"] == ERROR_REF, (path, method, status)


def test_the_schema_declares_retry_after_on_429_and_503(schema):
    for (path, method), refusals in REFUSALS.items():
        responses = schema["paths"][path][method]["responses"]
        for status in refusals & {"429", "503"}:
            header = responses[status]["headers"]["Retry-After"]
            assert header["required"] is True
            assert header["schema"] == {"type": "integer", "minimum": 1}


def test_the_schema_declares_the_upload_request_exactly_as_the_server_enforces_it(schema, settings):
    create = schema["components"]["schemas"]["UploadCreate"]
    fields = create["properties"]

    assert set(create["required"]) == {"filename", "size"}
    assert (fields["filename"]["minLength"], fields["filename"]["maxLength"]) == (1, 16384)
    assert fields["size"]["type"] == "integer"
    assert fields["size"]["format"] == "int64"
    assert (fields["size"]["minimum"], fields["size"]["maximum"]) == (1, settings.DIRECTDRIVEX_MAX_FILE_SIZE)
    # Blank or 64 hex digits; blank or at most 256 characters without NUL.
    assert fields["sha256"]["oneOf"] == [
        {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
        {"type": "string", "maxLength": 0},
    ]
    assert fields["fingerprint"]["oneOf"] == [
        {"type": "string", "pattern": "^[^\\u0000]+$", "maxLength": 256},
        {"type": "string", "maxLength": 0},
    ]


def test_the_size_maximum_in_the_schema_follows_the_setting(db, anonymous_client, settings):
    settings.DIRECTDRIVEX_MAX_FILE_SIZE = 1000

    schema = anonymous_client.get(URL, {"format": "json"}).json()

    size = schema["components"]["schemas"]["UploadCreate"]["properties"]["size"]
    assert (size["minimum"], size["maximum"]) == (1, 1000)


def test_the_schema_marks_what_can_be_null_in_an_upload(schema):
    for name in ("Upload", "UploadCreated"):
        upload = schema["components"]["schemas"][name]
        nullable = {field for field, spec in upload["properties"].items() if spec.get("nullable")}

        assert nullable == {"completed_at", "expires_at", "ws_url"}, name
        assert "fingerprint" in upload["required"], name


def test_sizes_and_offsets_in_answers_are_int64(schema):
    for name in ("Upload", "UploadCreated"):
        fields = schema["components"]["schemas"][name]["properties"]

        assert (fields["size"]["format"], fields["size"]["minimum"]) == ("int64", 1), name
        assert (fields["offset"]["format"], fields["offset"]["minimum"]) == ("int64", 0), name


def test_the_schema_declares_the_list_parameters_and_its_link_header(schema):
    listing = schema["paths"]["/api/uploads/"]["get"]

    assert set(parameter(listing, "status")["schema"]["enum"]) == {
        "uploading",
        "complete",
        "failed",
        "cancelled",
        "expired",
    }
    assert parameter(listing, "limit")["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
    assert parameter(listing, "cursor")["schema"]["pattern"] == "^([0-9]{1,17})-([0-9a-f]{32})$"
    headers = listing["responses"]["200"]["headers"]
    assert not headers["Link"].get("required")
    assert headers["Cache-Control"]["schema"] == {"type": "string", "enum": ["no-store"]}


def test_the_schema_declares_the_error_shape(schema):
    error = schema["components"]["schemas"]["Error"]

    assert set(error["required"]) == {"code", "detail"}
    assert set(error["properties"]) == {"code", "detail", "retry_after", "errors"}


def test_the_schema_declares_token_and_session_auth(schema):
    schemes = schema["components"]["securitySchemes"]

    assert schemes["tokenAuth"]["type"] == "apiKey"
    assert schemes["tokenAuth"]["name"] == "Authorization"
    assert schemes["cookieAuth"]["in"] == "cookie"


def test_the_schema_declares_the_download_as_bytes_with_its_range_and_validator_headers(schema):
    download = schema["paths"][CONTENT]["get"]
    responses = download["responses"]

    for status in ("200", "206"):
        assert responses[status]["content"] == {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
        }, status
        assert {"ETag", "Last-Modified", "Content-Disposition", "Accept-Ranges"} <= set(responses[status]["headers"])
    assert "content" not in responses["304"]
    assert set(responses["304"]["headers"]) == {"ETag", "Last-Modified"}
    assert responses["206"]["headers"]["Content-Range"]["required"] is True
    assert responses["416"]["headers"]["Content-Range"]["required"] is True
    assert "Content-Range" not in responses["200"]["headers"]
    request_headers = {p["name"] for p in download["parameters"] if p["in"] == "header"}
    assert request_headers == {"Range", "If-Range", "If-None-Match", "If-Modified-Since"}

"""Thin DRF views: validate, call one service, shape the answer. Refusals map in uploads.api_errors."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from uploads.downloads import download_response
from uploads.serializers import (
    ErrorSerializer,
    ShareCreateSerializer,
    ShareSerializer,
    SlotSummarySerializer,
    UploadCreatedSerializer,
    UploadCreateSerializer,
    UploadListQuerySerializer,
    UploadSerializer,
    cursor_after,
)
from uploads.services.shares import share_create, share_revoke, shares_of
from uploads.services.slots import slots_summary
from uploads.services.uploads import upload_create, upload_delete, upload_for, uploads_of


def refusal(description: str) -> OpenApiResponse:
    return OpenApiResponse(ErrorSerializer, description=f'{description} Body: {{"code", "detail"}}.')


# The schema lists every refusal an operation can answer, so that a client (and schemathesis) knows them all.
INVALID = refusal('400 invalid: a field or parameter is missing or malformed (field errors in "errors").')
UNAUTHENTICATED = refusal("401 unauthenticated: no or bad credentials; WWW-Authenticate: Token.")
NO_CSRF = refusal("403 permission_denied: a session call without its CSRF token.")
NOT_FOUND = refusal("404 not_found: no such upload, or another user's.")
UNAVAILABLE = refusal("503 unavailable: the database or channel layer is down or out of connections; Retry-After.")
RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    {"type": "integer", "minimum": 1},
    OpenApiParameter.HEADER,
    required=True,
    response=[429, 503],
    description="Seconds until the same request may succeed; the body's retry_after says the same.",
)
NO_STORE = OpenApiParameter(
    "Cache-Control",
    {"type": "string", "enum": ["no-store"]},
    OpenApiParameter.HEADER,
    required=True,
    response=[200],
    description="Offsets are resume points: a cached copy would resume at the wrong byte.",
)
NEXT_PAGE = OpenApiParameter(
    "Link",
    str,
    OpenApiParameter.HEADER,
    response=[200],
    description='<URL of the next page>; rel="next", present only when there are more uploads.',
)


class UploadListCreate(APIView):
    @extend_schema(
        parameters=[UploadListQuerySerializer, NEXT_PAGE, NO_STORE, RETRY_AFTER],
        responses={
            200: UploadSerializer(many=True),
            400: INVALID,
            401: UNAUTHENTICATED,
            503: UNAVAILABLE,
        },
    )
    def get(self, request):
        # A plain dict: see UploadListQuerySerializer.
        query = UploadListQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        given = query.validated_data
        limit = given["limit"]
        # One more than a page: whether it exists says whether there is a next page.
        uploads = list(uploads_of(request.user, given.get("status"), after=given.get("cursor"))[: limit + 1])
        response = Response(UploadSerializer(uploads[:limit], many=True).data, headers={"Cache-Control": "no-store"})
        if len(uploads) > limit:
            after = request.query_params.copy()
            after["cursor"] = cursor_after(uploads[limit - 1])
            response["Link"] = f'<{request.build_absolute_uri(f"{request.path}?{after.urlencode()}")}>; rel="next"'
        return response

    @extend_schema(
        request=UploadCreateSerializer,
        parameters=[RETRY_AFTER],
        responses={
            201: UploadCreatedSerializer,
            400: INVALID,
            401: UNAUTHENTICATED,
            403: NO_CSRF,
            413: refusal(
                "413 file_too_large: size above the maximum; 413 quota_exceeded: it does not fit your quota; "
                "413 request_too_large: the body is larger than the server reads."
            ),
            415: refusal("415 unsupported_media_type: the body is not application/json."),
            429: refusal("429 user_slots_exhausted / global_slots_exhausted: no upload slot is free; Retry-After."),
            503: UNAVAILABLE,
        },
    )
    def post(self, request):
        given = UploadCreateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        upload, _slot = upload_create(request.user, **given.validated_data)
        return Response(UploadCreatedSerializer(upload).data, status=status.HTTP_201_CREATED)


class UploadDetail(APIView):
    @extend_schema(
        parameters=[NO_STORE, RETRY_AFTER],
        responses={200: UploadSerializer, 401: UNAUTHENTICATED, 404: NOT_FOUND, 503: UNAVAILABLE},
    )
    def get(self, request, upload_id):
        upload = upload_for(request.user, upload_id)
        # The offset is the resume point: a cached copy would resume at the wrong byte.
        return Response(UploadSerializer(upload).data, headers={"Cache-Control": "no-store"})

    @extend_schema(
        parameters=[RETRY_AFTER],
        responses={204: None, 401: UNAUTHENTICATED, 403: NO_CSRF, 404: NOT_FOUND, 503: UNAVAILABLE},
    )
    def delete(self, request, upload_id):
        upload_delete(request.user, upload_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class SlotSummary(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(
        parameters=[RETRY_AFTER],
        responses={
            200: SlotSummarySerializer,
            401: UNAUTHENTICATED,
            403: refusal("403 permission_denied: staff only."),
            503: UNAVAILABLE,
        },
    )
    def get(self, request):
        return Response(slots_summary())


class AnyAcceptForDownloads(DefaultContentNegotiation):
    """A download is bytes whatever the client's Accept says; only its refusals are rendered, as JSON."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


def _header(name: str, description: str, *, response=None, schema=str, required: bool = False) -> OpenApiParameter:
    return OpenApiParameter(
        name, schema, OpenApiParameter.HEADER, response=response or False, required=required, description=description
    )


# What GET /api/uploads/<id>/content reads and answers, per the spec's download row (docs/api.md).
CONTENT_REQUEST_HEADERS = [
    _header("Range", "One byte range: bytes=F-L, bytes=F- or bytes=-N. Several ranges: the whole file (200)."),
    _header("If-Range", "The ETag (or Last-Modified) the client holds: Range applies only if it still matches."),
    _header("If-None-Match", "ETags the client holds (or *): a match answers 304 without a body."),
    _header("If-Modified-Since", "Considered only without If-None-Match: not modified since then answers 304."),
]
CONTENT_RESPONSE_HEADERS = [
    _header("ETag", 'Strong, from the sha256: "<sha256>".', response=[200, 206, 304], required=True),
    _header("Last-Modified", "When the upload completed.", response=[200, 206, 304], required=True),
    _header(
        "Content-Disposition",
        "attachment; filename=<ASCII fallback>; filename*=UTF-8''<the name> (RFC 6266 / 5987).",
        response=[200, 206],
        required=True,
    ),
    _header("Accept-Ranges", "bytes", response=[200, 206], required=True),
    _header("Content-Length", "Bytes in this body: the file, or the range.", response=[200, 206], schema=int),
    _header(
        "Content-Range",
        "bytes F-L/N on 206; bytes */N on 416.",
        response=[206, 416],
        required=True,
    ),
]
FILE_BYTES = OpenApiResponse(OpenApiTypes.BINARY, description="The file's bytes (application/octet-stream).")


class UploadContent(APIView):
    """GET / HEAD /api/uploads/<id>/content: the finished file, with Range and conditional requests."""

    content_negotiation_class = AnyAcceptForDownloads

    # HEAD answers what GET would, without the body, and holds no slot. OpenAPI
    # generators leave HEAD out (DRF's endpoint enumerator skips it); docs/api.md says so.
    @extend_schema(
        parameters=[*CONTENT_REQUEST_HEADERS, *CONTENT_RESPONSE_HEADERS, RETRY_AFTER],
        responses={
            (200, "application/octet-stream"): FILE_BYTES,
            (206, "application/octet-stream"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The requested range of the file (Content-Range)."
            ),
            304: OpenApiResponse(description="Not modified: the client's ETag matches (If-None-Match). No body."),
            401: UNAUTHENTICATED,
            404: NOT_FOUND,
            409: refusal("409 not_complete: the upload is not complete; there is nothing to download yet."),
            416: refusal("416 range_not_satisfiable: the range starts past the end; Content-Range: bytes */N."),
            429: refusal("429 download_slots_exhausted: no download slot is free; Retry-After."),
            503: UNAVAILABLE,
        },
    )
    def get(self, request, upload_id):
        return download_response(request.user, upload_id, request.headers)

    def head(self, request, upload_id):
        return download_response(request.user, upload_id, request.headers, head=True)


class UploadShares(APIView):
    """POST / GET /api/uploads/<id>/shares/: links to a finished file (docs/sharing.md)."""

    @extend_schema(
        parameters=[NO_STORE, RETRY_AFTER],
        responses={200: ShareSerializer(many=True), 401: UNAUTHENTICATED, 404: NOT_FOUND, 503: UNAVAILABLE},
    )
    def get(self, request, upload_id):
        links = shares_of(request.user, upload_id)
        data = ShareSerializer(links, many=True, context={"request": request}).data
        # Counts and states change with every download: never a cached copy.
        return Response(data, headers={"Cache-Control": "no-store"})

    @extend_schema(
        request=ShareCreateSerializer,
        parameters=[RETRY_AFTER],
        responses={
            201: ShareSerializer,
            400: INVALID,
            401: UNAUTHENTICATED,
            403: NO_CSRF,
            404: NOT_FOUND,
            409: refusal("409 not_complete: only a finished file can be shared."),
            415: refusal("415 unsupported_media_type: the body is not application/json."),
            503: UNAVAILABLE,
        },
    )
    def post(self, request, upload_id):
        given = ShareCreateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        fields = {name: value for name, value in given.validated_data.items() if value is not None}
        link, token = share_create(request.user, upload_id, **fields)
        data = ShareSerializer(link, context={"request": request, "token": token}).data
        return Response(data, status=status.HTTP_201_CREATED, headers={"Cache-Control": "no-store"})


class ShareDetail(APIView):
    @extend_schema(
        parameters=[RETRY_AFTER],
        responses={
            204: None,
            401: UNAUTHENTICATED,
            403: NO_CSRF,
            404: refusal("404 not_found: no such share link, or another user's."),
            503: UNAVAILABLE,
        },
    )
    def delete(self, request, share_id):
        share_revoke(request.user, share_id)
        return Response(status=status.HTTP_204_NO_CONTENT)

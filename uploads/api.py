"""Thin DRF views: validate, call one service, shape the answer. Refusals map in uploads.api_errors."""

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from uploads.models import Upload
from uploads.serializers import (
    ErrorSerializer,
    SlotSummarySerializer,
    StatusQuerySerializer,
    UploadCreatedSerializer,
    UploadCreateSerializer,
    UploadSerializer,
)
from uploads.slots import slots_summary
from uploads.transfers import upload_create, upload_delete, upload_for, uploads_of

REFUSAL = OpenApiResponse(ErrorSerializer, description='{"code", "detail"} (and "errors" for field errors)')


class UploadListCreate(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("status", str, enum=Upload.Status.values, description="Only this status.")],
        responses={200: UploadSerializer(many=True), 400: REFUSAL},
    )
    def get(self, request):
        query = StatusQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        uploads = uploads_of(request.user, query.validated_data.get("status"))
        return Response(UploadSerializer(uploads, many=True).data)

    @extend_schema(
        request=UploadCreateSerializer,
        responses={201: UploadCreatedSerializer, 400: REFUSAL, 401: REFUSAL, 413: REFUSAL, 429: REFUSAL},
    )
    def post(self, request):
        given = UploadCreateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        upload, _slot = upload_create(request.user, **given.validated_data)
        return Response(UploadCreatedSerializer(upload).data, status=status.HTTP_201_CREATED)


class UploadDetail(APIView):
    @extend_schema(responses={200: UploadSerializer, 404: REFUSAL})
    def get(self, request, upload_id):
        upload = upload_for(request.user, upload_id)
        # The offset is the resume point: a cached copy would resume at the wrong byte.
        return Response(UploadSerializer(upload).data, headers={"Cache-Control": "no-store"})

    @extend_schema(responses={204: None, 404: REFUSAL})
    def delete(self, request, upload_id):
        upload_delete(request.user, upload_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class SlotSummary(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(responses={200: SlotSummarySerializer, 403: REFUSAL})
    def get(self, request):
        return Response(slots_summary())

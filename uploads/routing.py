"""ASGI routes of the uploads app: the upload transports that do not go through Django's views."""

from django.urls import path, re_path

from uploads.transports.progress import ProgressConsumer
from uploads.transports.tus import TusConsumer
from uploads.transports.websocket import UploadConsumer

# Every path under api/tus/: the consumer answers unknown ones itself (404, as JSON with tus headers).
http_urlpatterns = [
    re_path(r"^api/tus/", TusConsumer.as_asgi()),
]

websocket_urlpatterns = [
    path("ws/uploads/<str:upload_id>/", UploadConsumer.as_asgi()),
    path("ws/progress/", ProgressConsumer.as_asgi()),
]

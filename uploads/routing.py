"""WebSocket routes of the uploads app."""

from django.urls import path

from uploads.transports.progress import ProgressConsumer
from uploads.transports.websocket import UploadConsumer

websocket_urlpatterns = [
    path("ws/uploads/<str:upload_id>/", UploadConsumer.as_asgi()),
    path("ws/progress/", ProgressConsumer.as_asgi()),
]

"""WebSocket routes of the uploads app."""

from django.urls import path

from uploads.consumers import UploadConsumer

websocket_urlpatterns = [
    path("ws/uploads/<str:upload_id>/", UploadConsumer.as_asgi()),
]

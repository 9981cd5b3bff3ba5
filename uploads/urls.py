"""HTTP routes of the uploads app: the JSON API and the pages."""

from django.urls import path

from uploads import api, views

urlpatterns = [
    path("api/uploads/", api.UploadListCreate.as_view(), name="api-upload-list"),
    path("api/uploads/<str:upload_id>/", api.UploadDetail.as_view(), name="api-upload-detail"),
    path("api/slots/", api.SlotSummary.as_view(), name="api-slots"),
    path("", views.home, name="home"),
]

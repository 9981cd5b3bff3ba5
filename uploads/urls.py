"""HTTP routes of the uploads app: the JSON API and the pages."""

from django.urls import path

from uploads import api, share_pages, views

urlpatterns = [
    path("api/uploads/", api.UploadListCreate.as_view(), name="api-upload-list"),
    path("api/uploads/<str:upload_id>/", api.UploadDetail.as_view(), name="api-upload-detail"),
    # Without a trailing slash, as the contract writes it: it names a file, not a collection.
    path("api/uploads/<str:upload_id>/content", api.UploadContent.as_view(), name="api-upload-content"),
    path("api/uploads/<str:upload_id>/shares/", api.UploadShares.as_view(), name="api-upload-shares"),
    path("api/shares/<str:share_id>/", api.ShareDetail.as_view(), name="api-share-detail"),
    path("api/slots/", api.SlotSummary.as_view(), name="api-slots"),
    path("", views.home, name="home"),
    path("files/", views.files, name="files"),
    path("files/zip/", views.files_zip, name="files-zip"),
    path("files/<uuid:upload_id>/delete/", views.file_delete, name="file-delete"),
    path("files/<uuid:upload_id>/share/", views.file_share, name="file-share"),
    path("files/shares/<int:share_id>/revoke/", views.share_revoke_page, name="share-revoke"),
    path("accounts/signup/", views.signup, name="signup"),
    # A share link's page and its download: anyone with the token (uploads.share_pages).
    path("s/<str:token>", share_pages.share_page, name="share"),
    path("s/<str:token>/download", share_pages.share_download, name="share-download"),
    path("upload/", views.upload_page, name="upload"),
]

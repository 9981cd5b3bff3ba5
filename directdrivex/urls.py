"""Root URLconf: admin, sign-in pages, the API and its schema, the app's pages, and the error handlers."""

from django.contrib import admin
from django.contrib.auth.views import LoginView
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from uploads.metrics_views import metrics
from uploads.throttles import throttled_sign_in

urlpatterns = [
    # Both sign-in forms, Django's own views, throttled alike (uploads.views): matched before the
    # admin's and django.contrib.auth's own patterns, which keep their names for reverse().
    path("admin/login/", throttled_sign_in(admin.site.login)),
    path("admin/", admin.site.urls),
    path("accounts/login/", throttled_sign_in(LoginView.as_view()), name="login"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    # Prometheus' default metrics_path, without a slash (docs/operations.md, "Metrics").
    path("metrics", metrics, name="metrics"),
    path("", include("uploads.urls")),
]

# Errors Django itself answers (raised outside a view, e.g. in middleware): JSON
# on /api/ paths, Django's own pages elsewhere (uploads.api_errors).
handler400 = "uploads.api_errors.bad_request"
handler403 = "uploads.api_errors.permission_denied"
handler404 = "uploads.api_errors.page_not_found"
handler500 = "uploads.api_errors.server_error"

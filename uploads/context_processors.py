"""Template context shared by every page."""

from django.conf import settings


def directdrivex(request):
    return {"signup_open": settings.DIRECTDRIVEX_SIGNUP}

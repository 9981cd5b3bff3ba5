"""Page views (Django templates). They call the same services as the API."""

from django.shortcuts import render


def home(request):
    return render(request, "uploads/home.html")

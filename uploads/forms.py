"""Forms of the pages: sign-up (open only when DIRECTDRIVEX_SIGNUP is on)."""

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import UserCreationForm


class SignupForm(UserCreationForm):
    """Django's own user creation (password validators, case-insensitive unique username), plus an optional email."""

    class Meta(UserCreationForm.Meta):
        model = get_user_model()
        fields = ("username", "email")
        widgets = {"email": forms.EmailInput(attrs={"autocomplete": "email"})}

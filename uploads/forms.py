"""Forms of the pages: sign-up (open only when DIRECTDRIVEX_SIGNUP is on), a new share link."""

from django import forms
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import UserCreationForm

from uploads.services.shares import MAX_PASSWORD_LENGTH


class SignupForm(UserCreationForm):
    """Django's own user creation (password validators, case-insensitive unique username), plus an optional email."""

    class Meta(UserCreationForm.Meta):
        model = get_user_model()
        fields = ("username", "email")
        widgets = {"email": forms.EmailInput(attrs={"autocomplete": "email"})}


class ShareForm(forms.Form):
    """A new share link from My files: how many days it lasts, how many downloads it allows, an optional password.

    The bounds are the service's (uploads.services.shares.share_create), said in days and in words.
    """

    days = forms.IntegerField(label="Expires after (days)")
    max_downloads = forms.IntegerField(
        label="Most downloads",
        required=False,
        min_value=1,
        # The column's limit (a PostgreSQL integer), as the API's serializer has it.
        max_value=2**31 - 1,
        help_text="Empty: no limit.",
        error_messages={
            "invalid": "Most downloads must be a whole number, 1 or more (or empty for no limit).",
            "min_value": "Most downloads must be 1 or more (or empty for no limit).",
            "max_value": "Most downloads can be at most %(limit_value)s.",
        },
    )
    password = forms.CharField(
        label="Password",
        required=False,
        # As typed: a password's spaces are part of it.
        strip=False,
        max_length=MAX_PASSWORD_LENGTH,
        help_text="Optional: visitors must enter it before they see the file.",
        # new-password: a browser must not fill in the owner's own saved sign-in password here.
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        error_messages={"max_length": "The password is longer than %(limit_value)s characters."},
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Read per instance, so that the bounds follow the setting (as the API's serializer does).
        longest = settings.DIRECTDRIVEX_SHARE_MAX_DAYS
        out_of_range = f"A link lasts from 1 to {longest} days."
        self.fields["days"] = forms.IntegerField(
            label="Expires after (days)",
            min_value=1,
            max_value=longest,
            initial=longest,
            help_text=f"1 to {longest}.",
            error_messages={
                "required": f"Say how many days the link lasts (1 to {longest}).",
                "invalid": f"The number of days must be a whole number from 1 to {longest}.",
                "min_value": out_of_range,
                "max_value": out_of_range,
            },
        )

    def problems(self) -> str:
        """Every error of the form in one sentence, for a message on the page the form was sent from."""
        return " ".join(str(error) for errors in self.errors.values() for error in errors)

"""WhiteNoise, with its scan of the static files done once per process.

WhiteNoise's middleware, when it is built, finds every static file (with WHITENOISE_USE_FINDERS,
through every app's finder) and prepares its headers: 170 files and 33 ms here. A server builds
its middleware once; Django's test client builds it again for every client, and the test suite
makes thousands (19 % of the authorization matrix's time went to it). Without autorefresh the
files do not change while the process runs, so each later instance with the same settings reuses
the first one's table of files. With autorefresh (DEBUG) WhiteNoise finds files per request and
nothing is kept.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.conf import settings as django_settings
from whitenoise.middleware import WhiteNoiseMiddleware

# What decides which files WhiteNoise serves and the headers it prepares for them.
_KEYED_SETTINGS = (
    "DEBUG",
    "STATIC_ROOT",
    "STATIC_URL",
    "FORCE_SCRIPT_NAME",
    "STATICFILES_DIRS",
    "STATICFILES_FINDERS",
    "INSTALLED_APPS",
    "STORAGES",
    "WHITENOISE_AUTOREFRESH",
    "WHITENOISE_ROOT",
    "WHITENOISE_USE_FINDERS",
    "WHITENOISE_STATIC_PREFIX",
    "WHITENOISE_MAX_AGE",
    "WHITENOISE_ALLOW_ALL_ORIGINS",
    "WHITENOISE_CHARSET",
    "WHITENOISE_MIMETYPES",
    "WHITENOISE_ADD_HEADERS_FUNCTION",
    "WHITENOISE_INDEX_FILE",
    "WHITENOISE_IMMUTABLE_FILE_TEST",
)


def _settings_key(settings: Any) -> str:
    return repr([(name, getattr(settings, name, None)) for name in _KEYED_SETTINGS])


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoiseMiddleware whose table of files is built once per process and settings."""

    _tables: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, get_response: Any = None, settings: Any = django_settings) -> None:
        key = _settings_key(settings)
        self._reused = self._tables.get(key)
        super().__init__(get_response, settings)
        if self.autorefresh:
            return
        if self._reused is not None:
            self.files = self._reused
        else:
            self._tables[key] = self.files

    def add_files(self, root: Any, prefix: Any = None) -> None:
        if self._reused is None:
            super().add_files(root, prefix)

    def add_files_from_finders(self) -> None:
        if self._reused is None:
            super().add_files_from_finders()

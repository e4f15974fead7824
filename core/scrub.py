"""Scrubbing what a node URL may hide a secret in out of text fit to store, log or show
(billing.chain.errors explains the secrets; core.periodic stores errors through it)."""

from __future__ import annotations

import re

_URL = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^\s/?#@'\"<>]*@)?"
    r"(?P<host>[^\s/?#'\"<>,;)]*)(?P<rest>[/?#][^\s'\"<>]*?)?(?=[,.;)]?(?:[\s'\"<>]|$))"
)
# A request path without its host, as urllib3 writes it ("… with url: /v3/KEY?x=1", '"POST /v3/KEY HTTP/1.1"').
_BARE_PATH = re.compile(
    r"(?P<lead>\burl: |\b(?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) )(?P<path>/[^\s'\"<>]*)", re.IGNORECASE
)
_USERINFO = re.compile(r"(?P<scheme>://)[^\s/?#@'\"<>]*@")
REDACTED = "[redacted]"


def scrub(text: str) -> str:
    """`text` without what a node URL may hide a secret in: every URL is cut to scheme://host:port
    (userinfo, path, query and fragment become "[redacted]"), and a bare request path after "url: "
    or an HTTP method is replaced. Hosts and ports stay: they say which node failed."""

    def url(match: re.Match[str]) -> str:
        hidden = match["userinfo"] or (match["rest"] or "/") != "/"
        return f"{match['scheme']}{match['host']}{'/' + REDACTED if hidden else ''}"

    text = _BARE_PATH.sub(lambda m: f"{m['lead']}/{REDACTED}", _URL.sub(url, text))
    return _USERINFO.sub(r"\g<scheme>", text)  # whatever odd shape a URL had, never its credentials

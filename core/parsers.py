"""JSON request bodies, parsed with a bound on their nesting.

Python's JSON decoder recurses once per nested array or object, bounded only by the
interpreter's recursion limit, and py_ecc (imported with eth-account by every web process)
raises that limit to 100,000 at import: a body of nested brackets (200 KB of `[`) then overflows
the C stack and the process dies of a segmentation fault before any check runs. Any endpoint
that reads a JSON body would do, the agent's register endpoint without a credential.

`loads` refuses a body nested deeper than MAX_DEPTH (no request of this API comes near it) before
decoding it, in time linear in its size: most bodies have fewer brackets than that in all; the
others are measured outside their strings. `BoundedJSONParser` is DRF's JSONParser with it, and
answers 400 `parse_error` with a sentence that says why.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping
from typing import IO, Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser, get_encoding  # type: ignore[attr-defined]  # newer than the stubs
from rest_framework.utils.json import strict_constant

# Deeper than anything the API takes (a heartbeat's capabilities: 4 levels).
MAX_DEPTH = 64

# A JSON string literal, escapes included.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_OPENERS = frozenset("[{")


class TooDeep(ValueError):
    pass


def nesting_exceeds(text: str, max_depth: int = MAX_DEPTH) -> bool:
    """Whether `text`'s arrays and objects nest deeper than `max_depth` (brackets inside strings
    do not count; for text that is not JSON the answer may be either: the decoder judges it)."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    skeleton = _STRING.sub("", text)
    if skeleton.count("[") + skeleton.count("{") <= max_depth:
        return False
    depth = 0
    for match in _BRACKET.finditer(skeleton):
        if match.group() in _OPENERS:
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def loads(text: str, *, parse_constant: Any = strict_constant) -> Any:  # JSON values of any shape
    """json.loads, refusing NaN and Infinity (as DRF's strict JSON does) and nesting deeper than
    MAX_DEPTH (TooDeep, a ValueError)."""
    if nesting_exceeds(text):
        raise TooDeep(f"nested deeper than {MAX_DEPTH} levels")
    return json.loads(text, parse_constant=parse_constant)


class BoundedJSONParser(JSONParser):
    """DRF's JSONParser, with `loads`' bound on nesting."""

    # DRF's parse(): the stream, its media type and the view's context.
    def parse(
        self, stream: IO[Any], media_type: str | None = None, parser_context: Mapping[str, Any] | None = None
    ) -> Any:
        encoding = get_encoding(parser_context or {})  # DRF's: text codecs only
        try:
            text = codecs.getreader(encoding)(stream).read()
            return loads(text, parse_constant=strict_constant if self.strict else None)
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None

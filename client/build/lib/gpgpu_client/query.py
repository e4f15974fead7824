"""The search language of `gpgpu search`: terms separated by blanks, each mapped onto one query
parameter of GET /api/v1/gpus/.

    model=RTX-4090            model (a comma-separated list for several; the full name, as the
                              market shows it, any case: quote one with blanks,
                              model="NVIDIA GeForce RTX 4090")
    vram>=20  vram>20         min_vram_mb (GB by default; 24gb, 24564mb)
    price<=0.5                max_price (tokens per GPU-hour)
    region=eu                 region
    available  !available     available_now=true / false
    duration=2h               duration_s (the job's length: p_finish is then shown)
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from gpgpu_client.units import parse_duration, parse_price, parse_vram_mb

_TERM_RE = re.compile(r"(?P<key>[A-Za-z_]+)(?P<op>>=|<=|=|>|<)(?P<value>.*)")
KEYS = ("model", "vram", "price", "region", "available", "duration")


class QueryError(ValueError):
    """A term that cannot be read; `term` is the term as written."""

    def __init__(self, term: str, reason: str) -> None:
        super().__init__(f"bad search term {term!r}: {reason}")
        self.term = term
        self.reason = reason


def parse_query(query: str | Sequence[str]) -> dict[str, str]:
    """The query parameters for `query` (one string, or the command line's words, each split
    into terms like a shell's, quotes kept together); QueryError naming the first bad term."""
    terms: list[str] = []
    for text in [query] if isinstance(query, str) else query:
        try:
            terms.extend(shlex.split(text))
        except ValueError as exc:
            raise QueryError(text, str(exc)) from None
    params: dict[str, str] = {}
    seen: set[str] = set()
    for term in terms:
        key, param, value = _term(term)
        if key in seen:
            raise QueryError(term, f"{key} is given twice")
        seen.add(key)
        params[param] = value
    return params


def _term(term: str) -> tuple[str, str, str]:
    lowered = term.lower()
    if lowered in {"available", "available=true", "available=yes"}:
        return "available", "available_now", "true"
    if lowered in {"!available", "unavailable", "available=false", "available=no"}:
        return "available", "available_now", "false"
    match = _TERM_RE.fullmatch(term)
    if not match:
        raise QueryError(term, f"expected KEY=VALUE, vram>=GB, price<=PRICE or available (keys: {', '.join(KEYS)})")
    key, op, value = match["key"].lower(), match["op"], match["value"]
    if not value:
        raise QueryError(term, f"{key} needs a value")
    if any(ch in value for ch in "<>="):
        raise QueryError(term, f"the value {value!r} has an operator in it")
    try:
        if key == "model":
            _expect(term, key, op, {"="})
            names = [name.strip() for name in value.split(",") if name.strip()]
            if not names:
                raise QueryError(term, "model needs at least one name")
            return key, "model", ",".join(names)
        if key == "region":
            _expect(term, key, op, {"="})
            return key, "region", value
        if key == "vram":
            _expect(term, key, op, {">=", ">", "="})
            mb = parse_vram_mb(value)
            return key, "min_vram_mb", str(mb + 1 if op == ">" else mb)
        if key == "price":
            _expect(term, key, op, {"<=", "="})
            return key, "max_price", str(parse_price(value))
        if key == "duration":
            _expect(term, key, op, {"="})
            seconds = parse_duration(value)
            if seconds < 1:
                raise QueryError(term, "duration must be at least 1 second")
            return key, "duration_s", str(seconds)
    except ValueError as exc:
        if isinstance(exc, QueryError):
            raise
        raise QueryError(term, str(exc)) from None
    raise QueryError(term, f"unknown key {key!r} (keys: {', '.join(KEYS)})")


def _expect(term: str, key: str, op: str, allowed: set[str]) -> None:
    if op not in allowed:
        ops = " or ".join(sorted(allowed, key=len, reverse=True))
        raise QueryError(term, f"{key} takes {ops}, not {op}")

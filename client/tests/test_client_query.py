"""The search language of `gpgpu search`, mapped onto GET /api/v1/gpus/'s query parameters."""

from __future__ import annotations

import pytest

from gpgpu_client.query import QueryError, parse_query


def test_every_term_maps_onto_the_search_api_parameters() -> None:
    params = parse_query("model=RTX-4090 vram>=20 price<=0.5 region=eu available duration=2h")

    assert params == {
        "model": "RTX-4090",
        "min_vram_mb": str(20 * 1024),
        "max_price": "0.5",
        "region": "eu",
        "available_now": "true",
        "duration_s": "7200",
    }


@pytest.mark.parametrize(
    ("term", "param", "value"),
    [
        ("vram>=24gb", "min_vram_mb", "24576"),
        ("vram>=24564mb", "min_vram_mb", "24564"),
        ("vram>20", "min_vram_mb", "20481"),
        ("model=RTX-4090,A100", "model", "RTX-4090,A100"),
        ("!available", "available_now", "false"),
        ("price=1.25", "max_price", "1.25"),
        ("duration=90m", "duration_s", "5400"),
    ],
)
def test_units_and_variants(term: str, param: str, value: str) -> None:
    assert parse_query(term) == {param: value}


def test_a_quoted_model_name_keeps_its_blanks_and_words_are_terms() -> None:
    assert parse_query(['model="NVIDIA GeForce RTX 4090" vram>=24', "region=eu"]) == {
        "model": "NVIDIA GeForce RTX 4090",
        "min_vram_mb": "24576",
        "region": "eu",
    }


def test_an_unclosed_quote_is_a_bad_term() -> None:
    with pytest.raises(QueryError, match="No closing quotation"):
        parse_query('model="RTX 4090')


def test_an_empty_query_asks_for_everything() -> None:
    assert parse_query("   ") == {}


@pytest.mark.parametrize(
    ("term", "says"),
    [
        ("vram>>20", "operator"),
        ("vram<=20", "vram takes"),
        ("price>=0.5", "price takes"),
        ("price<=cheap", "not a price"),
        ("colour=red", "unknown key 'colour'"),
        ("model=", "needs a value"),
        ("fast", "expected KEY=VALUE"),
        ("duration=soon", "not a duration"),
    ],
)
def test_a_bad_term_is_named_with_the_reason(term: str, says: str) -> None:
    with pytest.raises(QueryError) as caught:
        parse_query(f"region=eu {term}")

    assert caught.value.term == term
    assert str(caught.value).startswith(f"bad search term {term!r}: ")
    assert says in str(caught.value)


def test_a_key_given_twice_is_refused() -> None:
    with pytest.raises(QueryError, match="region is given twice"):
        parse_query("region=eu region=us")

"""A provider's availability window as text (`mon-fri 20:00-08:00 Europe/Paris`), read into the
availability-window API's fields; a bad text is one line naming the bad part, exit 2."""

from __future__ import annotations

import pytest

from gpgpu_client.cli import main
from gpgpu_client.windows import WindowError, parse_window


def test_weekday_evenings_in_paris_become_the_apis_fields() -> None:
    assert parse_window("mon-fri 20:00-08:00 Europe/Paris") == {
        "days": ["mon", "tue", "wed", "thu", "fri"],
        "start_time": "20:00",
        "end_time": "08:00",
        "timezone": "Europe/Paris",
    }


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        ("sat,sun", ["sat", "sun"]),
        ("fri-mon", ["mon", "fri", "sat", "sun"]),
        ("Mon,wed-thu", ["mon", "wed", "thu"]),
        ("daily", ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]),
        ("weekdays", ["mon", "tue", "wed", "thu", "fri"]),
        ("weekends", ["sat", "sun"]),
        ("tue", ["tue"]),
    ],
)
def test_days_are_lists_ranges_wrapping_ranges_and_names(days: str, expected: list[str]) -> None:
    assert parse_window(f"{days} 9:00-17:30")["days"] == expected


def test_the_time_zone_defaults_to_utc_and_hours_get_two_digits() -> None:
    assert parse_window("sun 0:00-7:05") == {
        "days": ["sun"],
        "start_time": "00:00",
        "end_time": "07:05",
        "timezone": "UTC",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mon-fri", "is not a window"),
        ("mon-fri 20:00-08:00 Europe/Paris extra", "is not a window"),
        ("mon-fry 20:00-08:00", "'fry' is not a day"),
        ("mon-fri 20:00 Europe/Paris", "'20:00' is not a time range"),
        ("mon-fri 24:00-08:00", "'24:00' is not a time of day"),
        ("mon-fri 20:00-08:60", "'08:60' is not a time of day"),
        ("mon-fri 20:00-08:00 Mars/Olympus", "'Mars/Olympus' is not a time zone"),
    ],
)
def test_a_bad_window_names_its_bad_part(text: str, message: str) -> None:
    with pytest.raises(WindowError, match=message):
        parse_window(text)


def test_windows_add_with_a_bad_text_is_one_line_and_exit_2_before_any_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPGPU_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("GPGPU_TOKEN", "gpg_x")

    code = main(["provider", "windows", "add", "mon-fri 20:00-08:00 Mars/Olympus"])

    assert code == 2
    assert capsys.readouterr().err == (
        "gpgpu: bad window: 'Mars/Olympus' is not a time zone (an IANA name such as Europe/Paris, or UTC)\n"
    )

"""Durations and sizes as people write them."""

from __future__ import annotations

import pytest

from proxy.units import format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30), ("10m", 600), ("1h", 3600), ("1d", 86400), ("1h30m", 5400),
     ("0s", 0), ("1.5s", 1.5), (" 30s\n", 30)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "10", "10 m", "m", "-1s", "1w", "1s2", "s1", "٣s", "²s", "1.٣s"]
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.25, "250ms"), (30, "30s"), (600, "10m"), (86400, "1d"), (90, "90s")]
)
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("1024", 1024), ("512k", 524288), ("64m", 64 << 20), ("1G", 1 << 30), ("10mb", 10 << 20)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["ten", "", "-1", "٣k", "²m", "1.5m"])
def test_bad_size(text: str) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)

"""Sizes and CPU amounts: the spellings people use, the mistakes they make, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hourai.units import format_size, parse_cpus, parse_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("0", 0),
        ("512k", 512 * KiB),
        ("512K", 512 * KiB),
        ("128M", 128 * MiB),
        ("128m", 128 * MiB),
        ("128MiB", 128 * MiB),
        ("128mib", 128 * MiB),
        ("128MB", 128 * MiB),
        ("128 MiB", 128 * MiB),
        (" 2G ", 2 * GiB),
        ("1.5G", 3 * GiB // 2),
        ("1.5K", 1536),
        (".5M", MiB // 2),
        ("1T", TiB),
        ("100B", 100),
        ("100b", 100),
        ("1.1T", 1209462790553),  # exact, not a float's neighbour
    ],
)
def test_parse_size_accepts_the_documented_forms(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_rounds_fractional_bytes_down() -> None:
    assert parse_size("0.1k") == 102


def test_parse_size_passes_ints_through() -> None:
    assert parse_size(4096) == 4096


@pytest.mark.parametrize(
    "bad",
    ["", "  ", "M", "12X", "1.2.3M", "-1M", "1e6", "12 M B", "1iB", "0x10", "1KK", "one", "1,5G"],
)
def test_parse_size_rejects_with_the_value_and_the_accepted_forms(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert "128M" in message and "1024" in message


@pytest.mark.parametrize("bad", [-1, True, 1.5, None])
def test_parse_size_rejects_non_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1000, "1000 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (1280, "1.25 KiB"),
        (128 * MiB, "128 MiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (5 * TiB, "5 TiB"),
        (2048 * TiB, "2048 TiB"),
        (1500, "1500 B"),  # 1.46484375 KiB would need rounding
        (MiB + 1, "1048577 B"),
    ],
)
def test_format_size_is_exact_by_default(n: int, text: str) -> None:
    assert format_size(n) == text


def test_format_size_inexact_reads_like_a_measurement() -> None:
    assert format_size(123456789, exact=False) == "117.7 MiB"
    assert format_size(512, exact=False) == "512 B"


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_format_size_rejects_non_counts(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid byte count"):
        format_size(bad)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=1 << 62))
def test_format_then_parse_is_identity(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(
    st.integers(min_value=0, max_value=1 << 20),
    st.sampled_from(["", "k", "K", "m", "M", "g", "G", "t", "T"]),
    st.sampled_from(["", "B", "iB", "b", "ib"]),
    st.sampled_from(["", " "]),
)
def test_every_spelling_of_a_whole_unit_parses(n: int, unit: str, suffix: str, gap: str) -> None:
    if not unit and suffix.lower() == "ib":
        return  # "5iB" is not a size: iB only follows a unit letter
    scale = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}[unit.lower()]
    assert parse_size(f"{n}{gap}{unit}{suffix}") == n * scale


@given(st.integers(min_value=0, max_value=1 << 50), st.sampled_from([KiB, MiB, GiB]))
def test_multiples_format_in_their_unit_and_back(n: int, unit: int) -> None:
    text = format_size(n * unit)
    assert parse_size(text) == n * unit
    assert len(text) <= 20


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.5", 0.5), ("2", 2.0), (" 1.25 ", 1.25), ("500m", 0.5), ("1500m", 1.5), (".25", 0.25)],
)
def test_parse_cpus_accepts_cores_and_millicores(text: str, expected: float) -> None:
    assert parse_cpus(text) == pytest.approx(expected)


def test_parse_cpus_passes_numbers_through() -> None:
    assert parse_cpus(3) == 3.0
    assert parse_cpus(0.5) == 0.5


@pytest.mark.parametrize("bad", ["0", "0.0", "-1", "", "half", "1 core", "1e3", "0m", "nan", "inf"])
def test_parse_cpus_rejects_with_the_value_and_the_accepted_forms(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_cpus(bad)
    assert repr(bad) in str(info.value)
    assert "0.5" in str(info.value)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), True, None])
def test_parse_cpus_rejects_non_positive_numbers(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid CPU amount"):
        parse_cpus(bad)  # type: ignore[arg-type]

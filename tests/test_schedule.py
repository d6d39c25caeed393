"""EventBridge schedule expressions: the documented examples, refusals, and properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hourai.invocations.schedule import Cron, Rate, ScheduleError, check, parse

T0 = datetime(2026, 12, 1, 20, 17, 34, tzinfo=UTC)  # a Tuesday


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("cron(0 10 * * ? *)", T0, at(2026, 12, 2, 10, 0)),
        ("cron(15 12 * * ? *)", at(2026, 12, 1, 12, 15), at(2026, 12, 2, 12, 15)),
        ("cron(0 18 ? * MON-FRI *)", at(2026, 12, 4, 18, 0), at(2026, 12, 7, 18, 0)),
        ("cron(0 8 1 * ? *)", T0, at(2027, 1, 1, 8, 0)),
        ("cron(0/15 * * * ? *)", T0, at(2026, 12, 1, 20, 30)),
        ("cron(0/5 8-17 ? * MON-FRI *)", at(2026, 12, 4, 17, 55), at(2026, 12, 7, 8, 0)),
        ("cron(0 9 ? * 2#1 *)", T0, at(2026, 12, 7, 9, 0)),  # first Monday
        ("cron(0 0 L * ? *)", T0, at(2026, 12, 31, 0, 0)),
        ("cron(0 0 L 2 ? 2028)", T0, at(2028, 2, 29, 0, 0)),
        ("cron(0 0 ? * 6L *)", T0, at(2026, 12, 25, 0, 0)),  # last Friday
        ("cron(0 0 15W * ? *)", T0, at(2026, 12, 15, 0, 0)),  # a Tuesday itself
        ("cron(0 0 1W 8 ? 2026-2030)", T0, at(2027, 8, 2, 0, 0)),  # Aug 1 2027 is a Sunday
        ("cron(0 0 LW * ? *)", T0, at(2026, 12, 31, 0, 0)),
        ("cron(0 12 * JAN,JUL ? *)", T0, at(2027, 1, 1, 12, 0)),
        ("cron(30 1 ? * SUN *)", T0, at(2026, 12, 6, 1, 30)),
    ],
)
def test_eventbridge_examples(expr: str, after: datetime, expected: datetime) -> None:
    schedule = parse(expr)
    assert isinstance(schedule, Cron)
    assert schedule.next_after(after) == expected
    assert schedule.matches(expected)


def test_rate() -> None:
    r = parse("rate(5 minutes)")
    assert isinstance(r, Rate) and r.seconds == 300
    assert r.next_after(T0, T0) == T0 + timedelta(minutes=5)
    assert r.next_after(T0 + timedelta(minutes=5), T0) == T0 + timedelta(minutes=10)
    assert r.between(T0, T0 + timedelta(minutes=17), T0) == (3, T0 + timedelta(minutes=15))
    assert parse("rate(1 day)").seconds == 86400  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("rate(1 minutes)", "rate(1 minute)"),
        ("rate(5 minute)", "rate(5 minutes)"),
        ("rate(0 minutes)", "positive"),
        ("rate(5 seconds)", "unit"),
        ("cron(0 12 * * * *)", "exactly one"),
        ("cron(0 12 ? * ? *)", "exactly one"),
        ("cron(0 12 * * ?)", "six fields"),
        ("cron(60 12 * * ? *)", "out of range"),
        ("cron(0 12 32 * ? *)", "out of range"),
        ("cron(0 12 ? * 8 *)", "out of range"),
        ("cron(0 12 ? * FRI-MON *)", "backwards"),
        ("cron(0 12 1,L * ? *)", "stand alone"),
        ("cron(0 12 ? * 2#6 *)", "out of range"),
        ("cron(0 0 30 2 ? *)", "never fires"),
        ("0 12 * * *", "not a schedule expression"),
    ],
)
def test_refusals(expr: str, why: str) -> None:
    with pytest.raises(ScheduleError, match=why.replace("(", r"\(").replace(")", r"\)")):
        check(expr, T0)


def _part(lo: int, hi: int) -> st.SearchStrategy[str]:
    n = st.integers(lo, hi)
    return st.one_of(
        st.just("*"),
        n.map(str),
        st.tuples(n, n).map(lambda p: f"{min(p)}-{max(p)}"),
        st.tuples(n, st.integers(1, 20)).map(lambda p: f"{p[0]}/{p[1]}"),
        st.lists(n, min_size=1, max_size=3).map(lambda v: ",".join(map(str, v))),
    )


@st.composite
def crons(draw: st.DrawFn) -> str:
    day = draw(
        st.one_of(
            _part(1, 31).map(lambda d: f"{d} * ?"),
            st.sampled_from(["L", "LW", "1W", "15W", "31W"]).map(lambda d: f"{d} * ?"),
            _part(1, 7).map(lambda d: f"? * {d}"),
            st.tuples(st.integers(1, 7), st.integers(1, 5)).map(lambda p: f"? * {p[0]}#{p[1]}"),
            st.integers(1, 7).map(lambda d: f"? * {d}L"),
        )
    )
    dom, month, dow = day.split()
    month = draw(st.one_of(st.just("*"), _part(1, 12)))
    return f"cron({draw(_part(0, 59))} {draw(_part(0, 23))} {dom} {month} {dow} *)"


times = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
)


@given(crons(), times)
def test_next_tick_is_the_first_match_after(expr: str, t: datetime) -> None:
    schedule = parse(expr)
    assert isinstance(schedule, Cron)
    tick = schedule.next_after(t)
    if tick is None:
        return  # e.g. the 31st of months that have 30 days only
    assert tick > t and schedule.matches(tick)
    # nothing matches in between: checked minute by minute where the gap is short
    if tick - t < timedelta(days=2):
        m = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        while m < tick:
            assert not schedule.matches(m), f"{m} matches before {tick}"
            m += timedelta(minutes=1)


@given(st.text(max_size=40))
def test_anything_else_is_refused_cleanly(text: str) -> None:
    try:
        parse(text)
    except ScheduleError:
        pass


@given(st.integers(1, 1000), st.sampled_from(["minute", "hour", "day"]), times, times)
def test_rate_ticks(value: int, unit: str, anchor: datetime, t: datetime) -> None:
    r = parse(f"rate({value} {unit}{'s' if value > 1 else ''})")
    assert isinstance(r, Rate)
    tick = r.next_after(t, anchor)
    assert tick > t or (t < anchor and tick == anchor)
    assert (tick - anchor).total_seconds() % r.seconds == 0
    assert tick - timedelta(seconds=r.seconds) <= max(t, anchor - timedelta(seconds=r.seconds))

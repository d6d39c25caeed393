"""EventBridge schedule expressions: ``rate(...)`` and six-field ``cron(...)``, in UTC.

Pure: parse a string into a :class:`Rate` or :class:`Cron`, ask for the next tick after a
time. Written to EventBridge's rules, not Unix cron's:

- ``rate(VALUE UNIT)``: VALUE a positive integer, UNIT ``minute``/``hour``/``day`` —
  singular for 1, plural otherwise, as EventBridge insists. Ticks are counted from an
  anchor (when the schedule was first seen), not aligned to the clock.
- ``cron(MINUTES HOURS DAY-OF-MONTH MONTH DAY-OF-WEEK YEAR)``: ``, - * /`` everywhere;
  month names JAN-DEC; weekdays 1-7 = SUN-SAT or SUN-SAT names; exactly one of
  day-of-month and day-of-week is ``?``; day-of-month may be ``L`` (last day), ``LW`` (last
  weekday), ``15W`` (the weekday nearest the 15th, within the month); day-of-week may be
  ``5L`` (the last Thursday) or ``2#1`` (the first Monday); years 1970-2199.

Anything else is refused with :class:`ScheduleError` naming the field and what it allows.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

MIN_YEAR, MAX_YEAR = 1970, 2199
MONTHS = {m.upper(): i for i, m in enumerate(calendar.month_abbr) if m}
WEEKDAYS = {"SUN": 1, "MON": 2, "TUE": 3, "WED": 4, "THU": 5, "FRI": 6, "SAT": 7}
_RATE = re.compile(r"rate\(\s*(\d+)\s+([a-z]+)\s*\)")
_CRON = re.compile(r"cron\((.*)\)")
_UNITS = {"minute": 60, "hour": 3600, "day": 86400}


class ScheduleError(ValueError):
    """A schedule expression hourai does not accept; the message says why."""


def _dow(d: date) -> int:
    """EventBridge's day of week: 1 = Sunday ... 7 = Saturday."""
    return (d.weekday() + 1) % 7 + 1


@dataclass(frozen=True)
class Rate:
    text: str
    seconds: int

    def next_after(self, t: datetime, anchor: datetime) -> datetime:
        """The first tick strictly after ``t``; ticks are ``anchor + k * period``."""
        if t < anchor:
            return anchor
        k = int((t - anchor).total_seconds() // self.seconds) + 1
        return anchor + timedelta(seconds=k * self.seconds)

    def between(
        self, start: datetime, end: datetime, anchor: datetime
    ) -> tuple[int, datetime | None]:
        """How many ticks fall in ``(start, end]``, and the last of them."""
        first = self.next_after(start, anchor)
        if first > end:
            return 0, None
        n = int((end - first).total_seconds() // self.seconds) + 1
        return n, first + timedelta(seconds=(n - 1) * self.seconds)


DayTest = Callable[[int, int, int], bool]  # (year, month, day) -> matches


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    months: tuple[int, ...]
    years: tuple[int, ...]
    day: DayTest

    def matches(self, t: datetime) -> bool:
        return (
            t.second == 0
            and t.minute in self.minutes
            and t.hour in self.hours
            and t.month in self.months
            and t.year in self.years
            and self.day(t.year, t.month, t.day)
        )

    def next_after(self, t: datetime, anchor: datetime | None = None) -> datetime | None:
        """The first tick strictly after ``t`` (None: there is none before 2200)."""
        start = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        for year in self.years:
            if year < start.year:
                continue
            for month in self.months:
                if (year, month) < (start.year, start.month):
                    continue
                for day in range(1, calendar.monthrange(year, month)[1] + 1):
                    if (year, month, day) < (start.year, start.month, start.day):
                        continue
                    if not self.day(year, month, day):
                        continue
                    for hour in self.hours:
                        for minute in self.minutes:
                            when = datetime(year, month, day, hour, minute, tzinfo=UTC)
                            if when >= start:
                                return when
        return None

    def between(
        self, start: datetime, end: datetime, anchor: datetime | None = None, cap: int = 100_000
    ) -> tuple[int, datetime | None]:
        n, last = 0, None
        tick = self.next_after(start)
        while tick is not None and tick <= end and n < cap:
            n, last = n + 1, tick
            tick = self.next_after(tick)
        return n, last


Schedule = Rate | Cron


def parse(text: str) -> Schedule:
    """A schedule from its expression; ScheduleError says what is wrong."""
    if not isinstance(text, str):
        raise ScheduleError(f"a schedule is a string, got {text!r}")
    expr = text.strip()
    m = _RATE.fullmatch(expr)
    if m:
        value, unit = int(m[1]), m[2]
        base = unit[:-1] if unit.endswith("s") else unit
        if base not in _UNITS:
            raise ScheduleError(f"{text!r}: the unit is minute(s), hour(s) or day(s), not {unit!r}")
        if value < 1:
            raise ScheduleError(f"{text!r}: the rate must be a positive number")
        if (value == 1) != (unit == base):
            want = base if value == 1 else base + "s"
            raise ScheduleError(f"{text!r}: write rate({value} {want})")
        return Rate(expr, value * _UNITS[base])
    m = _CRON.fullmatch(expr)
    if not m:
        raise ScheduleError(
            f"{text!r} is not a schedule expression: use rate(5 minutes) or "
            "cron(MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK YEAR), e.g. cron(0 12 * * ? *)"
        )
    fields = m[1].split()
    if len(fields) != 6:
        raise ScheduleError(
            f"{text!r}: cron takes six fields (minutes hours day-of-month month day-of-week "
            f"year), got {len(fields)}"
        )
    minute, hour, dom, month, dow, year = fields
    if (dom == "?") == (dow == "?"):
        raise ScheduleError(
            f"{text!r}: exactly one of day-of-month and day-of-week must be '?' "
            "(e.g. cron(0 12 * * ? *) or cron(0 12 ? * MON-FRI *))"
        )
    try:
        cron = Cron(
            expr,
            _field(minute, 0, 59, "minutes"),
            _field(hour, 0, 23, "hours"),
            _field(month, 1, 12, "month", MONTHS),
            _field(year, MIN_YEAR, MAX_YEAR, "year"),
            _day_of_month(dom) if dow == "?" else _day_of_week(dow),
        )
    except ScheduleError as exc:
        raise ScheduleError(f"{text!r}: {exc}") from None
    return cron


def _number(text: str, lo: int, hi: int, what: str, names: dict[str, int] | None) -> int:
    if names and text.upper() in names:
        return names[text.upper()]
    if not text.isdigit():
        raise ScheduleError(
            f"{what}: {text!r} is not a number"
            + (f" or a name ({', '.join(names)})" if names else "")
        )
    n = int(text)
    if not lo <= n <= hi:
        raise ScheduleError(f"{what}: {n} is out of range {lo}-{hi}")
    return n


def _field(
    text: str, lo: int, hi: int, what: str, names: dict[str, int] | None = None
) -> tuple[int, ...]:
    """``*``, ``N``, ``N-M``, with ``/STEP``, comma-separated: the sorted values."""
    out: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ScheduleError(f"{what}: bad step in {part!r}")
            step = int(step_text)
        if base == "*":
            first, last = lo, hi
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = _number(a, lo, hi, what, names), _number(b, lo, hi, what, names)
            if first > last:
                raise ScheduleError(f"{what}: the range {base!r} runs backwards")
        else:
            first = _number(base, lo, hi, what, names)
            last = hi if slash else first
        out.update(range(first, last + 1, step))
    return tuple(sorted(out))


def _weekday_near(year: int, month: int, day: int) -> int:
    """The weekday (Mon-Fri) nearest ``day``, without leaving the month (Quartz's ``W``)."""
    last = calendar.monthrange(year, month)[1]
    day = min(day, last)
    wd = date(year, month, day).weekday()
    if wd < 5:
        return day
    if wd == 5:  # Saturday: the Friday before, unless that is in the previous month
        return day - 1 if day > 1 else day + 2
    return day + 1 if day < last else day - 2  # Sunday


def _day_of_month(text: str) -> DayTest:
    if text == "L":
        return lambda y, m, d: d == calendar.monthrange(y, m)[1]
    if text == "LW":
        return lambda y, m, d: d == _weekday_near(y, m, calendar.monthrange(y, m)[1])
    if text.endswith("W"):
        target = _number(text[:-1], 1, 31, "day-of-month", None)
        return lambda y, m, d: d == _weekday_near(y, m, target)
    if any(c in text for c in "LW#"):
        raise ScheduleError(
            f"day-of-month: {text!r}: L, LW and NW stand alone (not in lists or ranges)"
        )
    days = frozenset(_field(text, 1, 31, "day-of-month"))
    return lambda y, m, d: d in days


def _day_of_week(text: str) -> DayTest:
    if "#" in text:
        a, _, b = text.partition("#")
        wd = _number(a, 1, 7, "day-of-week", WEEKDAYS)
        nth = _number(b, 1, 5, "day-of-week (the N of #N)", None)
        return lambda y, m, d: _dow(date(y, m, d)) == wd and (d - 1) // 7 + 1 == nth
    if text == "L":
        text = "7L"  # Quartz: L alone is the last day of the week, Saturday
    if text.endswith("L"):
        wd = _number(text[:-1], 1, 7, "day-of-week", WEEKDAYS)
        return lambda y, m, d: _dow(date(y, m, d)) == wd and d + 7 > calendar.monthrange(y, m)[1]
    days = frozenset(_field(text, 1, 7, "day-of-week", WEEKDAYS))
    return lambda y, m, d: _dow(date(y, m, d)) in days


def check(text: str, now: datetime | None = None) -> str:
    """The expression, if it parses and fires at least once more; else ScheduleError."""
    schedule = parse(text)
    if isinstance(schedule, Cron):
        now = now or datetime.now(UTC)
        if schedule.next_after(now) is None:
            raise ScheduleError(f"{text!r} never fires again")
    return schedule.text

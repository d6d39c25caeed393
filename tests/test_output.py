"""A function's output through OutputReader: whole lines within the function's budget, what
is dropped counted and said, over-long lines cut with what was cut said, over a real pipe."""

from __future__ import annotations

import asyncio
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from hourai.snapshot.manager import MAX_LINE, OutputBudget, OutputReader, function_of


def _read_all(
    writes: list[bytes], budget: OutputBudget, tag: str = "fn#1"
) -> list[tuple[str, str]]:
    """Write `writes` into a pipe read by an OutputReader until EOF; what reached the sink."""

    async def scenario() -> list[tuple[str, str]]:
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        os.set_blocking(w, False)
        got: list[tuple[str, str]] = []
        reader = OutputReader(loop, r, tag, lambda t, line: got.append((t, line)), budget)
        for data in writes:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(w, view)
                except BlockingIOError:
                    n = 0
                view = view[n:]
                await asyncio.sleep(0)  # let the reader drain the pipe
        os.close(w)
        for _ in range(10_000):
            if reader.fd < 0:
                break
            await asyncio.sleep(0.001)
        return got

    return asyncio.run(scenario())


def test_function_of_a_tag() -> None:
    assert function_of("hello#1234") == "hello" and function_of("hello/snapshot") == "hello"


@settings(max_examples=50)
@given(
    st.lists(
        st.text(
            st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=50
        ),
        max_size=40,
    ),
    st.data(),
)
def test_output_within_the_budget_comes_out_line_for_line(lines: list[str], data) -> None:
    stream = "".join(line + "\n" for line in lines).encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    got = _read_all([p for p in pieces if p], OutputBudget())
    assert [line for _, line in got] == [line.encode().decode() for line in lines]


def test_a_flood_is_dropped_counted_and_said() -> None:
    budget = OutputBudget(line_rate=1, line_burst=100, byte_rate=1 << 20, byte_burst=1 << 20)
    got = _read_all([b"".join(b"line %06d\n" % i for i in range(50_000))], budget)
    lines = [line for _, line in got]
    kept = [line for line in lines if line.startswith("line ")]
    notices = [line for line in lines if "dropped" in line]
    assert kept[:3] == ["line 000000", "line 000001", "line 000002"]
    assert 100 <= len(kept) <= 110  # the burst, and what the rate refilled meanwhile
    # one notice when dropping starts, then at most one a second, and the rest at EOF
    assert 1 <= len(notices) <= 3
    dropped = sum(int(notice.split()[1]) for notice in notices)
    assert dropped + len(kept) == 50_000
    assert "fn printed more than its output limit of 1 lines/s" in notices[0]


def test_a_long_line_keeps_its_head_and_says_how_much_was_cut() -> None:
    got = _read_all([b"a" * (5 << 20) + b"\nnext\n"], OutputBudget())
    (first, second) = (line for _, line in got)
    assert first.startswith("a" * MAX_LINE) and len(first) < MAX_LINE + 100
    assert first.endswith("(5.0 MiB more of this line cut)")
    assert second == "next"


def test_a_line_without_a_newline_is_handed_over_at_eof_and_cut_too() -> None:
    got = _read_all([b"b" * (MAX_LINE + 10)], OutputBudget())
    assert [line for _, line in got] == ["b" * MAX_LINE + " … (10 B more of this line cut)"]

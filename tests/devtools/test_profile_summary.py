"""The benchmark's profile summary (`benchmarks/profile.py`) of py-spy's raw output."""

from __future__ import annotations

from benchmarks.profile import summarise

RAW = "\n".join(
    [
        "main (/app/worker/cli.py:10);handle (/app/worker/core/handler.py:5);"
        "validate (/venv/lib/python3.11/site-packages/pydantic/main.py:7) 6",
        "main (/app/worker/cli.py:10);handle (/app/worker/core/handler.py:9) 3",
        "main (/app/worker/cli.py:10);publish (/venv/lib/python3.11/site-packages/aiormq/x.py:1) 1",
        "main (/app/worker/cli.py:10);select (/usr/lib/python3.11/selectors.py:468) 10",
        "not a stack line",
    ]
)


def test_frames_are_ranked_by_own_and_total_samples_with_the_idle_loop_apart() -> None:
    summary = summarise(RAW, top=2)

    assert (summary.samples, summary.idle) == (20, 10)
    # Own: the leaf frame, its line numbers merged; only the top two.
    assert summary.own == [
        ("validate (pydantic/main.py)", 6),
        ("handle (worker/core/handler.py)", 3),
    ]
    # Total: anywhere on the stack, the entry points left out.
    assert summary.total[0] == ("handle (worker/core/handler.py)", 9)
    assert dict(summary.packages) == {"pydantic": 6, "worker.core.handler": 3, "aiormq": 1}
    markdown = summary.markdown("title")
    assert "10 working samples" in markdown
    assert "| 60.0% | `validate (pydantic/main.py)` |" in markdown

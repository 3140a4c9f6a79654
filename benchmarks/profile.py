"""A summary of a py-spy profile: the frames where the worker spends its time.

py-spy's raw format is one line per distinct stack, ``frame;frame;...;leaf count``, with
each frame as ``function (file:line)``. The summary ranks frames two ways: by *own* samples
(the frame was the leaf: the code itself was running) and by *total* samples (the frame was
anywhere on the stack), merging the lines of one function. The idle event loop (a leaf in
``select``/``epoll``) is counted apart, so that the shares are of the time spent working.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
#: Leaf frames that mean the process was waiting, not working.
_IDLE = ("select (selectors.py)", "poll (selectors.py)", "_run_once (asyncio/base_events.py)")


@dataclass(frozen=True)
class Summary:
    samples: int
    idle: int
    own: list[tuple[str, int]]
    total: list[tuple[str, int]]
    packages: list[tuple[str, int]]
    """Own samples by library (or worker module): where the time goes, coarsely."""

    def markdown(self, title: str) -> str:
        working = max(1, self.samples - self.idle)
        lines = [
            f"# {title}",
            "",
            f"{self.samples:,} samples, {self.idle:,} of them in the idle event loop; "
            f"shares below are of the {working:,} working samples.",
            "",
            "| Own % | Frame (own samples: the code itself running) |",
            "|--:|---|",
        ]
        lines += [f"| {n / working:.1%} | `{frame}` |" for frame, n in self.own]
        lines += ["", "| Total % | Frame (total samples: on the stack) |", "|--:|---|"]
        lines += [f"| {n / working:.1%} | `{frame}` |" for frame, n in self.total]
        lines += ["", "| Own % | Library or module |", "|--:|---|"]
        lines += [f"| {n / working:.1%} | `{package}` |" for package, n in self.packages]
        return "\n".join(lines) + "\n"


def _name(frame: str) -> str:
    """``function (file)`` with the line number dropped and the path cut to its package."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3", "/worker/", "/benchmarks/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3":
                path = path.split("/", 1)[-1]
            elif marker in ("/worker/", "/benchmarks/"):
                path = marker.strip("/") + "/" + path
            break
    return f"{match['function']} ({path})"


def _package(name: str) -> str:
    """The library of a frame named by `_name`: its top-level package, or the module."""
    match = re.search(r"\((?P<path>[^()]*)\)$", name)
    path = match["path"] if match else name
    if path.startswith(("worker/", "benchmarks/")):
        return path.removesuffix(".py").replace("/", ".")
    first = path.split("/", 1)[0]
    return first.removesuffix(".py")


def summarise(raw: str, top: int = 10) -> Summary:
    packages: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        samples += count
        if frames[-1] in _IDLE:
            idle += count
            continue
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            total[frame] += count
    return Summary(
        samples, idle, own.most_common(top), _working(total, top), packages.most_common(top * 2)
    )


def _working(total: Counter[str], top: int) -> list[tuple[str, int]]:
    """The heaviest frames on the stack below the event loop's own (which hold everything)."""
    skip = (
        "run (asyncio/",
        "Runner.run (asyncio/",
        "run_forever (asyncio/",
        "_run_once (asyncio/",
        "_run (asyncio/",
        "<module>",
        "main (worker/cli.py)",
        "_run (worker/cli.py)",
        "_run_module_as_main",
        "_run_code",
    )
    ranked = [(f, n) for f, n in total.most_common() if not f.startswith(skip)]
    return ranked[:top]


def write_summary(raw_file: Path, output: Path, title: str) -> Summary:
    summary = summarise(raw_file.read_text())
    output.write_text(summary.markdown(title))
    return summary

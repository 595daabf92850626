"""Kill a training process with a real signal at a random step, several times.

`run_with_kills` starts a command, waits until its metrics file has grown by a random
number of rows, sends the signal, and starts the resume command; after the last kill
it lets the run finish. Used by the resume tests of `fit` and of the command.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def count_rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def read_rows(path: Path) -> list[dict]:
    """The metrics file's rows, refusing NaN / Infinity tokens (strict JSON)."""

    def refuse(token):
        raise ValueError(f"{path} holds the non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def run_with_kills(
    command: Callable[[bool], Sequence[str]],
    metrics: Path,
    *,
    kills: int,
    seed: int,
    rows_between: tuple[int, int],
    sig: int = signal.SIGKILL,
    timeout: float = 240,
) -> list[int]:
    """Run ``command(resume)`` to the end, killed ``kills`` times with ``sig``; returns
    the rows the metrics file had at each kill. Fails if a run ends before its kill or
    the last one does not exit 0."""
    rng = random.Random(seed)
    killed_at = []
    for attempt in range(kills + 1):
        process = subprocess.Popen(
            list(command(attempt > 0)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        if attempt == kills:
            _, err = process.communicate(timeout=timeout)
            assert process.returncode == 0, err.decode()[-2000:]
            break
        target = count_rows(metrics) + rng.randint(*rows_between)
        while process.poll() is None and count_rows(metrics) < target:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.002)
        assert process.poll() is None, (
            f"the run ended before kill {attempt + 1}: " + process.stderr.read().decode()[-2000:]
        )
        process.send_signal(sig)
        process.wait(timeout=timeout)
        killed_at.append(count_rows(metrics))
    return killed_at


def without(rows: list[dict], keys: Sequence[str] = ("wall_time", "compiles")) -> list[dict]:
    """Rows without the fields that differ between processes (times, compile counts)."""
    return [{k: v for k, v in row.items() if k not in keys} for row in rows]

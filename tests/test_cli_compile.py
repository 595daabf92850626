"""The command's compiling: JAX's persistent compilation cache (on by default, in the
package's cache directory) and the next buckets compiled ahead. Runs the command in
subprocesses: the cache is a process-wide JAX setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TINY = ["--dataset", "synthetic", "--model", "logreg", "--examples", "2000", "--evals", "2",
        "--min-batch-size", "8", "--max-batch-size", "64", "--no-progress",
        "--method", "norm-test", "--eta", "1"]  # fmt: skip

# Runs the command and prints, as its last line, the persistent-cache hits JAX reported.
COUNT_HITS = """
import sys, jax
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
from adaptive_batch.cli import main
code = main(sys.argv[1:])
print(hits.count("/jax/compilation_cache/cache_hits"))
sys.exit(code)
"""


def run(tmp_path, name, *options, cache_root=None):
    env = dict(os.environ, ADAPTIVE_BATCH_CACHE=str(cache_root or tmp_path / "package-cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = tmp_path / name
    result = subprocess.run(
        [sys.executable, "-c", COUNT_HITS, "train", *TINY, "--out", str(out), *options],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return int(result.stdout.split()[-1]), summary, [r for r in rows if "step" in r], result


def test_a_second_run_reads_its_compiled_steps_from_the_default_cache(tmp_path):
    hits, first, rows, _ = run(tmp_path, "first")
    buckets = {r["padded_size"] for r in rows}
    assert len(buckets) >= 3  # the norm test at η = 1 grows through 8 → 64
    cache = tmp_path / "package-cache" / "xla"
    assert hits == 0 and len(list(cache.iterdir())) >= len(buckets)
    hits, second, rows_again, _ = run(tmp_path, "second")
    assert hits >= len(buckets)  # every step program came from the cache
    # The same programs: the same run, to the last bit.
    assert [r["loss"] for r in rows_again] == [r["loss"] for r in rows]
    assert second["test_accuracy"] == first["test_accuracy"]


def test_no_compile_cache_writes_and_reads_nothing(tmp_path):
    run(tmp_path, "first")
    hits, _, _, _ = run(tmp_path, "off", "--no-compile-cache", cache_root=tmp_path / "other")
    assert hits == 0 and not (tmp_path / "other" / "xla").exists()


def test_compile_cache_option_names_the_directory(tmp_path):
    directory = tmp_path / "mine"
    run(tmp_path, "first", "--compile-cache", str(directory))
    assert any(directory.iterdir()) and not (tmp_path / "package-cache" / "xla").exists()
    hits, _, _, _ = run(tmp_path, "second", "--compile-cache", str(directory))
    assert hits > 0


def test_compile_ahead_is_on_by_default_and_can_be_turned_off(tmp_path):
    # 200 examples end the run in bucket 16 (8, then 16s): ahead of time, the buckets
    # 32 and 64 above were compiled too; without, only the two the run used.
    budget = ["--examples", "200", "--no-compile-cache"]
    _, ahead, rows, _ = run(tmp_path, "ahead", *budget)
    _, needed, rows_needed, _ = run(tmp_path, "needed", *budget, "--no-compile-ahead")
    assert {r["padded_size"] for r in rows} == {8, 16}
    assert (ahead["compiles"], needed["compiles"]) == (4, 2)
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_needed]


def test_contradicting_compile_cache_options_exit_2(tmp_path):
    env = dict(os.environ, ADAPTIVE_BATCH_CACHE=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "adaptive_batch", "train", "--compile-cache", str(tmp_path),
         "--no-compile-cache"], capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1  # one line, from argparse
    assert "argument --no-compile-cache: not allowed with argument --compile-cache" in result.stderr
    (tmp_path / "file").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "adaptive_batch", "train", "--compile-cache",
         str(tmp_path / "file")], capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "is a file; pass a directory" in result.stderr


def test_damaged_cache_entries_are_compiled_again(tmp_path):
    """Every entry of the cache overwritten with garbage (a crash mid-write, a bad
    disk): the next run warns in one line per entry, compiles anew and trains the same."""
    _, first, rows, _ = run(tmp_path, "first")
    entries = [p for p in (tmp_path / "package-cache" / "xla").iterdir() if p.is_file()]
    assert entries
    for entry in entries:
        entry.write_bytes(b"not an executable")
    hits, again, rows_again, result = run(tmp_path, "again")
    assert hits == 0
    assert "adaptive-batch train: warning: Error reading persistent compilation cache" in (
        result.stderr
    )
    assert [r["loss"] for r in rows_again] == [r["loss"] for r in rows]
    assert again["test_accuracy"] == first["test_accuracy"]

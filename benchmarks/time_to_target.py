"""Time to target: the command's default adaptive run against a constant-batch SGD grid.

On MNIST-1D with the CNN (the command's defaults), each seed runs, interleaved:

* ``cabs cold`` — ``adaptive-batch train`` (CABS, pow2 buckets, the next buckets
  compiled ahead) with an empty compilation cache: a first run on a new machine;
* ``cabs warm`` — the same run again, reading the compilation cache the cold run
  wrote: what ``compare``, further seeds and ``--resume`` see;
* ``cabs no-ahead`` — cold, with ``--no-compile-ahead`` (each bucket compiles when
  first used): what compiling ahead saves;
* ``sgd B lr`` — ``--method sgd --batch-size B --lr lr`` for B in 16, 32, 128 and lr
  in 0.1, 0.3, each with an empty cache (and ``warm`` copies of the grid's best).

Every run is a separate process of the command (``--no-progress``), so no run shares
another's compiled programs except through the cache directory it is given. Read from
each run's ``summary.json`` and ``metrics.jsonl``: steps, examples and wall time
(``wall_time``: the loop's own time, evaluations excluded, the first compile included)
to the target test accuracy, final test accuracy, and for the adaptive runs the split of
the wall time into

* compile pauses after the first step: each step that took over 3x the median step
  of its bucket counts its excess (compiles, and any other stall);
* the step: the compiled CABS step at each bucket, timed in this process, times the
  steps the run took in it; of that, *statistics* is the excess over a plain gradient
  step (SGD) at the same padded size, timed interleaved with it;
* host: the rest (loader, controller, records, Python).

Targets (issue 32, 2 CPU cores): compile pauses <= 10% of the adaptive run's wall time;
the adaptive run's wall time to 90% <= 1.2x the best SGD of the grid; the median
adaptive step <= 1.3x a plain step at the same padded batch size.

    python benchmarks/time_to_target.py            # 3 seeds, 30 epochs a run
    python benchmarks/time_to_target.py --quick    # 1 seed, 15 epochs a run

Last line: a JSON object with ``compile_share`` (cold and warm), ``time_to_target_ratio``
(adaptive / best SGD, medians over seeds, cold and warm) and ``step_ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_rounds, print_table

import adaptive_batch as ab
from adaptive_batch.datasets import load_dataset
from adaptive_batch.models import functional, make_model

SGD_GRID = [(b, lr) for b in (16, 32, 128) for lr in (0.1, 0.3)]


def run_command(out: Path, cache: Path, extra: list[str], args) -> dict:
    """One ``adaptive-batch train`` process; its summary and step records."""
    command = [
        sys.executable, "-m", "adaptive_batch", "train", "--out", str(out), "--no-progress",
        "--target", str(args.target), "--epochs", str(args.epochs), "--compile-cache",
        str(cache), *extra,
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 3):  # 3: the run diverged (its summary says so)
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "rows": [r for r in rows if "step" in r]}


def pauses(rows: list[dict]) -> float:
    """Seconds of steps after the first beyond 3x their bucket's median step (the excess)."""
    wall = np.array([r["wall_time"] for r in rows])
    sizes = np.array([r["padded_size"] for r in rows])[1:]
    seconds = np.diff(wall)
    total = 0.0
    for size in np.unique(sizes):
        times = seconds[sizes == size]
        median = float(np.median(times))
        total += float(np.sum(np.clip(times - median, 0, None)[times > 3 * median]))
    return total


def to_target(run: dict) -> dict:
    reached = run["summary"].get("to_target") or {}
    return {
        "steps": reached.get("steps"),
        "examples": reached.get("examples"),
        "seconds": reached.get("wall_time_s"),
        "final_accuracy": run["summary"]["test_accuracy"],
        "diverged": run["summary"]["diverged"],
        "wall": run["summary"]["wall_time_s"],
    }


def step_times(buckets: list[int], rounds: int) -> dict[int, tuple[float, float]]:
    """Per bucket: seconds of the compiled CABS step and of a plain SGD step (the unit),
    timed interleaved, padded batches of the bucket's size."""
    data = load_dataset("mnist1d")
    fns = functional(make_model("cnn", data.input_shape, data.num_classes))
    steps = {
        "cabs": (ab.cabs(0.3, min_batch_size=16, max_batch_size=2048), "auto"),
        "sgd": (optax.sgd(0.3), "auto"),
    }
    times = {}
    for size in buckets:
        batch = jax.tree.map(lambda a, rows=size: jnp.asarray(a[:rows]), data.train)
        mask = jnp.ones((size,), bool)
        calls = {}
        for name, (tx, backend) in steps.items():
            step = ab.make_train_step(fns.loss_fn, tx, backend=backend)
            state = (fns.params, tx.init(fns.params))
            jax.block_until_ready(step.run(state, batch, mask))

            def call(step=step, state=state, batch=batch, mask=mask):
                for _ in range(20):
                    jax.block_until_ready(step.run(state, batch, mask))

            calls[name] = call
        measured = interleaved_rounds(calls, rounds=rounds, budget_s=5.0)
        times[size] = tuple(statistics.median(measured[n]) / 20 for n in ("cabs", "sgd"))
    return times


def split(run: dict, times: dict[int, tuple[float, float]]) -> dict:
    rows = run["rows"]
    wall = rows[-1]["wall_time"]
    used = Counter(r["padded_size"] for r in rows)
    step = sum(n * times[size][0] for size, n in used.items())
    plain = sum(n * times[size][1] for size, n in used.items())
    paused = pauses(rows)
    first = rows[0]["wall_time"]
    return {
        "wall": wall,
        "first_step": first,
        "compile_pauses": paused,
        "statistics": step - plain,
        "plain_step": plain,
        "host": wall - first - paused - step,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 15 epochs a run")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--target", type=float, default=0.9)
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 3)
    args.epochs = args.epochs or (15 if args.quick else 30)
    print(f"{seeds} seed(s), {args.epochs:g} epochs a run, target {args.target:.0%}, "
          f"{os.cpu_count()} CPU cores, jax {jax.__version__}", flush=True)  # fmt: skip

    results: dict[str, list[dict]] = {}
    adaptive: dict[str, list[dict]] = {"cold": [], "warm": [], "no-ahead": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for seed in range(seeds):
            started = time.perf_counter()
            cold_cache = root / f"cache-cabs-{seed}"
            configs = [("cabs cold", cold_cache, [])]
            configs += [("cabs warm", cold_cache, [])]
            configs += [("cabs no-ahead", root / f"cache-noahead-{seed}", ["--no-compile-ahead"])]
            for b, lr in SGD_GRID:
                name = f"sgd {b} {lr}"
                extra = ["--method", "sgd", "--batch-size", str(b), "--lr", str(lr)]
                cache = root / f"cache-{name.replace(' ', '-')}-{seed}"
                configs += [(name, cache, extra), (f"{name} warm", cache, extra)]
            for name, cache, extra in configs:
                out = root / f"{name.replace(' ', '-')}-{seed}"
                run = run_command(out, cache, [*extra, "--seed", str(seed)], args)
                results.setdefault(name, []).append(to_target(run))
                if name.startswith("cabs"):
                    adaptive[name.split(" ", 1)[1]].append(run)
            print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)

    rows = []
    for name, runs in results.items():
        row = {"run": name}
        for key in ("steps", "examples", "seconds", "final_accuracy", "wall"):
            values = [r[key] for r in runs if r[key] is not None]
            row[key] = statistics.median(values) if len(values) == len(runs) else None
        row["reached"] = f"{sum(r['seconds'] is not None for r in runs)}/{len(runs)}"
        row["diverged"] = sum(r["diverged"] for r in runs)
        rows.append(row)
    print(f"\nto {args.target:.0%} test accuracy (medians over seeds; seconds: wall time "
          "to the target, wall: the whole run)")  # fmt: skip
    columns = ["run", "reached", "steps", "examples", "seconds", "final_accuracy", "wall"]
    print_table(rows, [*columns, "diverged"])

    buckets = sorted({r["padded_size"] for run in adaptive["cold"] for r in run["rows"]})
    times = step_times(buckets, rounds=15 if args.quick else 30)
    print("\ncompiled step per bucket, ms (CABS / plain SGD at the same padded size)")
    print_table(
        [
            {"bucket": b, "cabs": 1e3 * c, "sgd": 1e3 * p, "ratio": c / p}
            for b, (c, p) in times.items()
        ],
        ["bucket", "cabs", "sgd", "ratio"],
    )  # fmt: skip
    steps = [r["padded_size"] for run in adaptive["cold"] for r in run["rows"]]
    step_ratio = float(np.median([times[s][0] / times[s][1] for s in steps]))

    print("\nwhere the adaptive run's wall time goes, s (medians over seeds)")
    splits = {mode: [split(run, times) for run in runs] for mode, runs in adaptive.items()}
    split_rows = [
        {"run": f"cabs {mode}", **{k: statistics.median(s[k] for s in runs) for k in runs[0]}}
        for mode, runs in splits.items()
    ]
    print_table(split_rows, ["run", "wall", "first_step", "compile_pauses", "plain_step",
                             "statistics", "host"])  # fmt: skip

    def ratio(mode: str) -> float | None:
        per_seed = []
        for seed in range(seeds):
            mine = results[f"cabs {mode}"][seed]["seconds"]
            suffix = " warm" if mode == "warm" else ""
            best = [results[f"sgd {b} {lr}{suffix}"][seed]["seconds"] for b, lr in SGD_GRID]
            best = [s for s in best if s is not None]
            if mine is None or not best:
                return None
            per_seed.append(mine / min(best))
        return statistics.median(per_seed)

    summary = {
        "seeds": seeds,
        "epochs": args.epochs,
        "compile_share": {
            mode: statistics.median(s["compile_pauses"] / s["wall"] for s in runs)
            for mode, runs in splits.items()
        },
        "time_to_target_ratio": {mode: ratio(mode) for mode in ("cold", "warm", "no-ahead")},
        "step_ratio": step_ratio,
    }
    print(
        f"\ncompile pauses / wall: cold {summary['compile_share']['cold']:.1%}, warm "
        f"{summary['compile_share']['warm']:.1%}, no-ahead "
        f"{summary['compile_share']['no-ahead']:.1%} (target <= 10%)\n"
        f"time to {args.target:.0%}, CABS / best SGD of the grid: "
        f"{summary['time_to_target_ratio']} "
        f"(target <= 1.2)\nmedian step / plain step at the same padded size: {step_ratio:.2f} "
        "(target <= 1.3)"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

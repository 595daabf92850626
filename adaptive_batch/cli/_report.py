"""Tables for the terminal and for ``report.md``; time to a target accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Rows = Sequence[dict[str, Any]]


def time_to_target(rows: Rows, target: float) -> dict[str, Any] | None:
    """Steps, examples and wall time at the first evaluation with test accuracy >= target.

    Resolution is the evaluation interval (``--evals``): the true crossing lies between
    this evaluation and the one before. ``None`` if the target was never reached.
    """
    for row in rows:
        if row.get("test_accuracy", -1.0) >= target:
            return {
                "steps": row["step"],
                "examples": row["examples"],
                "wall_time_s": row["wall_time"],
                "test_accuracy": row["test_accuracy"],
            }
    return None


def _table(header: Sequence[str], body: Sequence[Sequence[str]], markdown: bool) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # fmt: skip

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in body)])


def summary_table(summary: dict[str, Any]) -> str:
    """The terminal table of one run."""
    body = [
        ["test accuracy", f"{summary['test_accuracy']:.1%}"],
        ["final train loss", f"{summary['final_train_loss']:.4f}"],
        ["steps", f"{summary['steps']:,}"],
        ["examples", f"{summary['examples']:,}"],
        ["wall time", f"{summary['wall_time_s']:.1f} s"],
        ["final batch size", f"{summary['final_batch_size']:,}"],
    ]
    if summary.get("skipped_steps"):
        body.append(["skipped steps (non-finite)", f"{summary['skipped_steps']:,}"])
    if "top_eigenvalue" in summary:
        body.append(["Hessian λ_max", f"{summary['top_eigenvalue']:.4g} (spectrum.png)"])
    reached = summary.get("to_target")
    if "target" in summary:
        body.append(
            [f"to {summary['target']:.0%} test accuracy",
             "not reached" if reached is None else
             f"{reached['steps']:,} steps, {reached['examples']:,} ex, "
             f"{reached['wall_time_s']:.1f} s"]
        )  # fmt: skip
    return _table(["metric", "value"], body, markdown=False)


def compare_table(summaries: dict[str, dict[str, Any]], target: float, markdown: bool) -> str:
    """One row per method: final test accuracy, and steps / examples / wall time to the
    target accuracy ("—" where it was not reached)."""
    header = [
        "method", "lr", "η/θ", "final test acc", f"steps to {target:.0%}",
        f"examples to {target:.0%}", f"time to {target:.0%} (s)", "steps", "final batch",
        "wall time (s)",
    ]  # fmt: skip
    body = []
    for name, s in summaries.items():
        reached = s.get("to_target")
        body.append(
            [
                name,
                f"{s['lr']:g}",
                "—" if s.get("tolerance") is None else f"{s['tolerance']:g}",
                f"{s['test_accuracy']:.1%}",
                "—" if reached is None else f"{reached['steps']:,}",
                "—" if reached is None else f"{reached['examples']:,}",
                "—" if reached is None else f"{reached['wall_time_s']:.1f}",
                f"{s['steps']:,}",
                f"{s['final_batch_size']:,}",
                f"{s['wall_time_s']:.1f}",
            ]
        )
    return _table(header, body, markdown=markdown)


#: The figures aggregated over seeds: (name, how to read it from a summary).
_FIGURES = {
    "test_accuracy": lambda s: s["test_accuracy"],
    "steps_to_target": lambda s: (s.get("to_target") or {}).get("steps"),
    "examples_to_target": lambda s: (s.get("to_target") or {}).get("examples"),
    "wall_time_to_target_s": lambda s: (s.get("to_target") or {}).get("wall_time_s"),
    "steps": lambda s: s["steps"],
    "final_batch_size": lambda s: s["final_batch_size"],
    "wall_time_s": lambda s: s["wall_time_s"],
}


def aggregate(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max of each figure over the seeds' summaries; a figure to the
    target over the seeds that reached it (``reached``: how many of them did)."""
    result: dict[str, Any] = {
        "num_seeds": len(per_seed),
        "reached": sum(bool(s.get("to_target")) for s in per_seed),
    }
    for name, read in _FIGURES.items():
        values = [v for v in (read(s) for s in per_seed) if v is not None and v == v]
        result[name] = (
            {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
            if values
            else None
        )
    return result


def _spread(figure: dict[str, Any] | None, fmt: str) -> str:
    """``mean (min–max)``; "—" for a figure no seed has."""
    if figure is None:
        return "—"
    mean, low, high = (format(figure[k], fmt) for k in ("mean", "min", "max"))
    return mean if low == high else f"{mean} ({low}–{high})"


def seeds_table(methods: dict[str, dict[str, Any]], target: float, markdown: bool) -> str:
    """One row per method (``methods``: name -> `aggregate`'s figures): each figure's
    mean and its range (min–max) over the seeds; the figures to the target over the
    seeds that reached it."""
    header = [
        "method", "seeds reaching", "final test acc", f"steps to {target:.0%}",
        f"examples to {target:.0%}", f"time to {target:.0%} (s)", "steps", "wall time (s)",
    ]  # fmt: skip
    body = []
    for name, a in methods.items():
        body.append(
            [
                name,
                f"{a['reached']}/{a['num_seeds']}",
                _spread(_scaled(a["test_accuracy"], 100), ".1f") + " %",
                _spread(a["steps_to_target"], ",.0f"),
                _spread(a["examples_to_target"], ",.0f"),
                _spread(a["wall_time_to_target_s"], ".1f"),
                _spread(a["steps"], ",.0f"),
                _spread(a["wall_time_s"], ".1f"),
            ]
        )
    return _table(header, body, markdown=markdown)


def _scaled(figure: dict[str, Any] | None, factor: float) -> dict[str, Any] | None:
    return None if figure is None else {k: v * factor for k, v in figure.items()}


def seeds_markdown(
    methods: dict[str, dict[str, Any]], *, title: str, target: float, budget: int,
    seeds: Sequence[int], plots: Sequence[str],
) -> str:  # fmt: skip
    """``report.md`` of a comparison over several seeds."""
    lines = [
        f"# {title}",
        "",
        f"Every method trained on the same budget of {budget:,} examples, once per seed "
        f"({', '.join(map(str, seeds))}: the seed of the model's initialisation and of the "
        f"data order). Each figure is the mean over the seeds, with its range (min–max) "
        f"in brackets; the figures to {target:.0%} test accuracy are over the seeds that "
        "reached it, read at the first test evaluation at or above it. Wall time counts "
        "training steps, compilation included, and no evaluation.",
        "",
        seeds_table(methods, target, markdown=True),
        "",
        f"The plots show seed {seeds[0]}. Every run's files are in "
        "`<method>/seed-<seed>/`; `report.json` holds every summary and these figures.",
        "",
    ]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def report_markdown(
    summaries: dict[str, dict[str, Any]], *, title: str, target: float, budget: int,
    plots: Sequence[str],
) -> str:  # fmt: skip
    lines = [
        f"# {title}",
        "",
        f"Every method trained on the same budget of {budget:,} examples. Target test "
        f"accuracy: {target:.0%}; steps, examples and wall time to it are read at the "
        "first test evaluation at or above it (so they are exact to one evaluation "
        "interval). Wall time counts training steps, compilation included, and no "
        "evaluation.",
        "",
        compare_table(summaries, target, markdown=True),
        "",
    ]
    reached = {n: s["to_target"]["steps"] for n, s in summaries.items() if s.get("to_target")}
    if reached:
        fewest = min(reached.values())
        tied = [name for name, steps in reached.items() if steps == fewest]
        names = " and ".join(f"**{name}**" for name in tied)
        each = " each, a tie" if len(tied) > 1 else ""
        lines += [f"Fewest optimizer steps to {target:.0%}: {names} ({fewest:,}{each}).", ""]
    missed = [n for n, s in summaries.items() if not s.get("to_target")]
    if missed:
        lines += [f"Did not reach {target:.0%} within the budget: {', '.join(missed)}.", ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)

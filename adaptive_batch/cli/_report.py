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

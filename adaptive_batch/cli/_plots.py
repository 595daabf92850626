"""PNG plots of one run and overlays of several (matplotlib, Agg backend: no display)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Rows = Sequence[dict[str, Any]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: np.ndarray, window: int = 25) -> np.ndarray:
    """Moving average of the noisy per-batch loss (shorter window at the start)."""
    if len(values) == 0:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumulative[idx] - cumulative[lo]) / (idx - lo)


def _column(rows: Rows, key: str, where: str | None = None) -> np.ndarray:
    """``rows``' values of ``key`` (NaN where missing or null), of the rows that have
    ``where`` if given."""
    values = [r.get(key) for r in rows if where is None or where in r]
    return np.array([np.nan if v is None else v for v in values], dtype=float)


# x axes: (key in a row, axis label)
_X = {
    "examples": ("examples", "training examples"),
    "time": ("wall_time", "wall time (s)"),
    "step": ("step", "optimizer step"),
}


def _x_axis(ax, x: str) -> None:
    key, label = _X[x]
    ax.set_xlabel(label)
    if key == "examples":
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, not 200000


def _loss_panel(ax, rows: Rows, x: str, label: str | None = None, color=None) -> None:
    key = _X[x][0]
    xs, losses = _column(rows, key), _column(rows, "loss")
    ax.plot(xs, _smooth(losses), color=color, label=label or "train (batch, smoothed)")
    if label is None:
        ax.plot(
            _column(rows, key, "test_loss"), _column(rows, "test_loss", "test_loss"),
            "o-", ms=3, label="test",
        )  # fmt: skip
        ax.legend()
    ax.set_yscale("log")
    _x_axis(ax, x)
    ax.set_ylabel("loss")


def _accuracy_panel(ax, rows: Rows, x: str, label: str | None = None, color=None) -> None:
    key = _X[x][0]
    ax.plot(
        _column(rows, key, "test_accuracy"), _column(rows, "test_accuracy", "test_accuracy"),
        "o-", ms=3, color=color, label=label,
    )  # fmt: skip
    _x_axis(ax, x)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)


def _rest_of_budget(rows: Rows, budget: int | None) -> bool:
    """Whether the last batch is what was left of the examples budget and smaller than
    the one before: the method did not choose it (it may be below --min-batch-size)."""
    return (
        budget is not None
        and len(rows) >= 2
        and rows[-1]["examples"] >= budget
        and rows[-1]["batch_size"] < rows[-2]["batch_size"]
    )


def _batch_panel(
    ax, rows: Rows, label: str | None = None, color=None, budget: int | None = None
) -> None:
    steps, sizes = _column(rows, "step"), _column(rows, "batch_size")
    rest = _rest_of_budget(rows, budget)
    end = -1 if rest else None
    (line,) = ax.plot(steps[:end], sizes[:end], color=color, label=label or "batch size")
    if rest:  # a point apart, not the end of the method's curve
        ax.plot(
            steps[-1:], sizes[-1:], "o", mfc="none", color=line.get_color(),
            label="last batch: rest of budget" if label is None else None,
        )  # fmt: skip
    if label is None and any("noise_scale" in r for r in rows):
        # What the data says beside what the rule asked: the test's demand is about
        # B_simple / η² (norm test), CABS's α·tr Σ / F.
        noise = _column(rows, "noise_scale")
        known = noise > 0  # not NaN (missing) nor 0 (undefined: a zero gradient)
        ax.plot(steps[known], np.exp(_smooth(np.log(noise[known]))), "--", lw=1,
                label="noise scale tr Σ / ‖ḡ‖² (smoothed)")  # fmt: skip
        ax.plot(steps, _column(rows, "suggested_batch_size"), lw=0.8, alpha=0.6,
                label="asked by the rule")  # fmt: skip
    if label is None and (rest or len(ax.get_lines()) > 1):
        ax.legend(fontsize=7)
    ax.set_yscale("log", base=2)
    _pow2_ticks(ax)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("batch size")


def _pow2_ticks(ax, most: int = 8) -> None:
    """Label powers of two as plain numbers around all the sizes drawn so far: the
    default log-2 axis labels only whole powers in range, one or none when the sizes
    stay within a factor of two or four."""
    from matplotlib.ticker import NullLocator

    lo, hi = ax.dataLim.intervaly
    if not (np.isfinite(lo) and np.isfinite(hi) and lo > 0):
        return
    first, last = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
    if last - first < 2:  # a (nearly) constant batch: a power below and above it too
        first, last = first - 1, last + 1
    stride = math.ceil((last - first + 1) / most)
    ticks = 2.0 ** np.arange(first, last + stride, stride)
    ax.set_yticks(ticks, [f"{t:.0f}" for t in ticks])
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(ticks[0] / 2**0.25, ticks[-1] * 2**0.25)  # lines off the frame


def _lr_panel(ax, rows: Rows) -> None:
    steps, lr = _column(rows, "step"), _column(rows, "learning_rate")
    with np.errstate(divide="ignore", invalid="ignore"):
        effective = _column(rows, "update_norm") / _column(rows, "grad_norm")
    ax.plot(steps, lr, label="learning rate")
    ax.plot(steps, effective, lw=1, label="effective: ‖update‖ / ‖ḡ‖")
    ax.set_yscale("log")
    values = np.concatenate([lr, effective])
    values = values[np.isfinite(values) & (values > 0)]
    if len(values):
        # At least a decade shown, so a constant rate is a flat line, not round-off noise.
        lo, hi = values.min(), values.max()
        ax.set_ylim(min(lo, hi / 10) / 1.5, hi * 1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.legend()


def run_plots(
    rows: Rows, out: Path, title: str, write: bool = True, budget: int | None = None
) -> list[Path]:
    """One run's plots: loss and accuracy against examples and wall time, batch size
    against step, learning rate against step, and ``overview.png`` with all six
    (their paths only, with ``write=False``). With the examples ``budget``, a last batch
    cut short by it is a marked point apart from the batch-size curve."""
    if not write:
        names = ["loss_vs_examples", "loss_vs_time", "accuracy_vs_examples",
                 "accuracy_vs_time", "batch_size", "learning_rate", "overview"]  # fmt: skip
        return [out / f"{name}.png" for name in names]
    plt = _pyplot()
    panels = {
        "loss_vs_examples": lambda ax: _loss_panel(ax, rows, "examples"),
        "loss_vs_time": lambda ax: _loss_panel(ax, rows, "time"),
        "accuracy_vs_examples": lambda ax: _accuracy_panel(ax, rows, "examples"),
        "accuracy_vs_time": lambda ax: _accuracy_panel(ax, rows, "time"),
        "batch_size": lambda ax: _batch_panel(ax, rows, budget=budget),
        "learning_rate": lambda ax: _lr_panel(ax, rows),
    }
    paths = []
    for name, draw in panels.items():
        fig, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
        draw(ax)
        ax.set_title(title, fontsize=9)
        paths.append(_save(fig, out / f"{name}.png", plt))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), layout="constrained")
    for ax, draw in zip(axes.T.ravel(), panels.values(), strict=True):
        draw(ax)
    fig.suptitle(title)
    paths.append(_save(fig, out / "overview.png", plt))
    return paths


def compare_plots(
    runs: dict[str, Rows], out: Path, title: str, target: float, budget: int | None = None
) -> list[Path]:
    """Overlays of several runs: test accuracy against steps, examples and wall time,
    train loss against examples, batch size against step; and ``compare_overview.png``
    (``budget``: as in `run_plots`)."""
    plt = _pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def overlay(ax, draw):
        for i, (name, rows) in enumerate(runs.items()):
            draw(ax, rows, name, colors[i % len(colors)])
        ax.legend(fontsize=8)

    def with_target(draw):
        def wrapped(ax):
            overlay(ax, draw)
            ax.axhline(target, color="gray", ls="--", lw=1)

        return wrapped

    def log_steps(draw):
        # Step counts differ by orders of magnitude between methods (that is the point).
        def wrapped(ax):
            draw(ax)
            ax.set_xscale("log")

        return wrapped

    panels = {
        "compare_accuracy_vs_steps": log_steps(
            with_target(lambda ax, r, n, c: _accuracy_panel(ax, r, "step", n, c))
        ),
        "compare_accuracy_vs_examples": with_target(
            lambda ax, r, n, c: _accuracy_panel(ax, r, "examples", n, c)
        ),
        "compare_accuracy_vs_time": with_target(
            lambda ax, r, n, c: _accuracy_panel(ax, r, "time", n, c)
        ),
        "compare_loss_vs_examples": lambda ax: overlay(
            ax, lambda ax, r, n, c: _loss_panel(ax, r, "examples", n, c)
        ),
        "compare_batch_size": log_steps(
            lambda ax: overlay(ax, lambda ax, r, n, c: _batch_panel(ax, r, n, c, budget))
        ),
    }
    paths = []
    for name, draw in panels.items():
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        draw(ax)
        ax.set_title(title, fontsize=9)
        paths.append(_save(fig, out / f"{name}.png", plt))
    # Five panels, no empty sixth: the batch sizes get the wide bottom right.
    names = list(panels)
    fig, axes = plt.subplot_mosaic(
        [names[:3], [names[3], names[4], names[4]]], figsize=(15, 8), layout="constrained"
    )
    for name, draw in panels.items():
        draw(axes[name])
    fig.suptitle(title)
    paths.append(_save(fig, out / "compare_overview.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""``adaptive-batch train``: one method, one run directory.

The run directory holds ``config.json`` (every option, resolved, and the data set's
provenance), ``metrics.jsonl`` (one JSON object per step), ``summary.json`` and PNG
plots (see `adaptive_batch.cli._plots.run_plots`).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from pathlib import Path
from typing import Any

from adaptive_batch.cli import _resolve
from adaptive_batch.cli._loop import LoopConfig, run
from adaptive_batch.cli._methods import Method
from adaptive_batch.cli._plots import run_plots
from adaptive_batch.cli._report import summary_table, time_to_target
from adaptive_batch.datasets import Dataset


def _versions() -> dict[str, str]:
    import flax
    import jax
    import optax

    import adaptive_batch

    return {
        "adaptive_batch": adaptive_batch.__version__, "jax": jax.__version__,
        "flax": flax.__version__, "optax": optax.__version__,
        "python": platform.python_version(), "backend": jax.default_backend(),
    }  # fmt: skip


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def train_one(
    method: Method,
    options: _resolve.Options,
    dataset: Dataset,
    out: Path,
    *,
    target: float | None = None,
    progress: bool = True,
    spectrum: bool = False,
    argv: list[str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train ``method`` and fill ``out`` with the run's files; return (summary, rows).

    With ``spectrum``, also the Hessian spectrum of the trained model (``spectrum.png``
    and ``top_eigenvalue`` in the summary, see `adaptive_batch.cli._spectrum`).
    """
    from adaptive_batch.models import functional, make_model

    model = make_model(options.model, dataset.input_shape, dataset.num_classes, seed=options.seed)
    fns = functional(model)
    lr = method.default_lr if options.lr is None else options.lr
    budget = options.budget(dataset)
    loop_config = LoopConfig(
        method=method, lr=lr, min_batch_size=options.min_batch_size,
        max_batch_size=options.max_batch_size, batch_size=options.batch_size,
        examples=budget, seed=options.seed, devices=options.devices, evals=options.evals,
        stats_backend=options.stats_backend, tolerance=options.eta,
        fill_buckets=options.fill_buckets,
    )  # fmt: skip
    import jax

    num_params = sum(x.size for x in jax.tree.leaves(fns.params))
    config = {
        "command": "adaptive-batch " + " ".join(sys.argv[1:] if argv is None else argv),
        "method": method.name, "method_summary": method.summary, "adaptive": method.adaptive,
        "lr": lr, "examples_budget": budget, "target": target,
        "tolerance": method.default_tolerance if options.eta is None else options.eta,
        **{k: v for k, v in dataclasses.asdict(options).items() if k != "lr"},
        "dataset_info": {**dataset.info, "num_train": dataset.num_train,
                         "num_test": dataset.num_test, "input_shape": dataset.input_shape,
                         "num_classes": dataset.num_classes},
        "model_params": num_params, "versions": _versions(),
    }  # fmt: skip
    _write_json(out / "config.json", config)

    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=budget, unit="ex", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
            mininterval=0.5,
            desc=f"{method.name} {options.dataset}/{options.model}",
        )  # fmt: skip
    with open(out / "metrics.jsonl", "w") as metrics_file:

        def on_row(row):
            rows.append(row)
            metrics_file.write(json.dumps(row) + "\n")

        try:
            summary, params = run(fns, dataset, loop_config, on_row=on_row, progress=bar)
        finally:
            if bar is not None:
                bar.close()
    summary = {"method": method.name, "lr": lr, "tolerance": config["tolerance"],
               "dataset": options.dataset,
               "model": options.model, **summary}  # fmt: skip
    if target is not None:
        summary["target"] = target
        summary["to_target"] = time_to_target(rows, target)
    title = f"{method.name} (lr {lr:g}) on {options.dataset} / {options.model}"
    summary["plots"] = [p.name for p in run_plots(rows, out, title)]
    if spectrum and not summary["diverged"]:
        from adaptive_batch.cli._spectrum import write_spectrum

        summary.update(write_spectrum(fns, params, dataset, out, seed=options.seed))
        summary["plots"].append(summary["spectrum_plot"])
    _write_json(out / "summary.json", summary)
    return summary, rows


def train_command(args) -> int:
    options = _resolve.common(args)
    method = _resolve.method(args.method)
    target = _resolve.target(args.target)
    out = _resolve.out_dir(
        args.out, f"{method.name}-{options.dataset}-{options.model}", args.overwrite
    )
    dataset = _resolve.dataset(options)
    _resolve.make_dir(out)
    summary, _ = train_one(
        method, options, dataset, out, target=target, progress=not args.no_progress,
        spectrum=args.spectrum,
    )  # fmt: skip
    print(summary_table(summary))
    if summary["diverged"]:
        print(f"warning: the loss became non-finite; try a smaller --lr than {summary['lr']:g}.")
    print(f"run directory: {out}")
    return 0

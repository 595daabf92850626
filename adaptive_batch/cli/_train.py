"""``adaptive-batch train``: one method, one run directory.

The run directory holds ``config.json`` (every option, resolved, and the data set's
provenance), ``metrics.jsonl`` (one JSON object per step), ``summary.json``, PNG plots
(see `adaptive_batch.cli._plots.run_plots`) and, with ``--checkpoint-every``,
``checkpoints/`` (Orbax), from which ``--resume`` continues the run exactly. Every JSON
file is strict JSON: a non-finite number is written as ``null``.

Exit codes: 0 done, 2 bad options, 3 diverged (non-finite steps or a non-finite loss
of the trained parameters), 74 a file could not be written (a full disk; the run stops,
metrics.jsonl keeps its whole lines), 130 interrupted by Ctrl-C, 143 by SIGTERM
(checkpoint and summary written).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from pathlib import Path
from typing import Any

from adaptive_batch.cli import _resolve
from adaptive_batch.cli._errors import UsageError
from adaptive_batch.cli._methods import METHODS, Method
from adaptive_batch.cli._plots import run_plots
from adaptive_batch.cli._report import summary_table, time_to_target
from adaptive_batch.cli._run import RunConfig, run
from adaptive_batch.datasets import Dataset
from adaptive_batch.training import strict_json

EXIT_DIVERGED = 3
EXIT_STOPPED = {"interrupted": 130, "terminated": 143}  # 128 + SIGINT / SIGTERM
#: config.json entries that may differ when resuming (they do not change the steps).
_MAY_DIFFER = {"command", "versions", "target", "checkpoint_every", "spectrum"}


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


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (non-finite numbers as null), written atomically (temp + rename), by
    process 0 only."""
    import jax

    if jax.process_index() != 0:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    try:
        tmp.write_text(text)
    except OSError as error:  # e.g. a full disk: leave no half-written .tmp behind
        tmp.unlink(missing_ok=True)
        error.filename = error.filename or str(tmp)  # a failed write names none
        raise
    tmp.replace(path)


def check_resumable(out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Refuse ``--resume`` where there is nothing to resume or the options differ;
    return the saved run's config."""
    from adaptive_batch.training._checkpoint import Checkpoints

    saved_path = out / "config.json"
    checkpoints = out / "checkpoints"
    if not saved_path.exists() or not checkpoints.is_dir():
        raise UsageError(
            f"--resume: {out} holds no checkpoint to resume (train with --checkpoint-every N "
            "to write them); leave out --resume to start a new run."
        )
    manager = Checkpoints(checkpoints)
    try:
        if manager.latest_step() is None:
            raise UsageError(
                f"--resume: {checkpoints} holds no complete checkpoint (the run stopped "
                "before its first); leave out --resume and pass --overwrite to start again."
            )
    finally:
        manager.close()
    saved = json.loads(saved_path.read_text())
    differ = [
        f"{key} {saved.get(key)!r} -> {config.get(key)!r}"
        for key in sorted(set(saved) | set(config))
        if key not in _MAY_DIFFER and saved.get(key) != config.get(key)
    ]
    if differ:
        raise UsageError(
            f"--resume: options differ from the run in {out} ({'; '.join(differ)}); pass "
            "that run's options, or train into a new --out."
        )
    return saved


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
    checkpoint_every: int | None = None,
    resume: bool = False,
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
    run_config = RunConfig(
        method=method, lr=lr, min_batch_size=options.min_batch_size,
        max_batch_size=options.max_batch_size, batch_size=options.batch_size,
        examples=budget, seed=options.seed, devices=options.devices, evals=options.evals,
        stats_backend=options.stats_backend, tolerance=options.eta,
        fill_buckets=options.fill_buckets, checkpoint_every=checkpoint_every, resume=resume,
        compile_ahead=options.compile_ahead,
    )  # fmt: skip
    import jax

    num_params = sum(x.size for x in jax.tree.leaves(fns.params))
    main_process = jax.process_index() == 0
    config = {
        "command": "adaptive-batch " + " ".join(sys.argv[1:] if argv is None else argv),
        "method": method.name, "method_summary": method.summary, "adaptive": method.adaptive,
        "lr": lr, "examples_budget": budget, "target": target,
        "tolerance": method.default_tolerance if options.eta is None else options.eta,
        **{k: v for k, v in dataclasses.asdict(options).items() if k != "lr"},
        "checkpoint_every": checkpoint_every,
        "dataset_info": {**dataset.info, "num_train": dataset.num_train,
                         "num_test": dataset.num_test, "input_shape": dataset.input_shape,
                         "num_classes": dataset.num_classes},
        "model_params": num_params, "versions": _versions(),
    }  # fmt: skip
    config = strict_json(config)  # tuples as lists, as config.json holds them
    if resume:
        saved = check_resumable(out, config)
        if checkpoint_every is None:  # keep checkpointing as the run did
            checkpoint_every = run_config.checkpoint_every = saved.get("checkpoint_every")
            config["checkpoint_every"] = checkpoint_every
    write_json(out / "config.json", config)

    summary, rows, params = run(
        fns, dataset, run_config, out, progress=progress,
        description=f"{method.name} {options.dataset}/{options.model}",
    )  # fmt: skip
    summary = {"method": method.name, "lr": lr, "tolerance": config["tolerance"],
               "dataset": options.dataset,
               "model": options.model, **summary}  # fmt: skip
    if target is not None:
        summary["target"] = target
        summary["to_target"] = time_to_target(rows, target)
    title = f"{method.name} (lr {lr:g}) on {options.dataset} / {options.model}"
    plots = run_plots(rows, out, title, write=main_process, budget=budget)
    summary["plots"] = [p.name for p in plots]
    if spectrum and not summary["diverged"] and main_process:
        from adaptive_batch.cli._spectrum import write_spectrum

        summary.update(write_spectrum(fns, params, dataset, out, seed=options.seed))
        summary["plots"].append(summary["spectrum_plot"])
    write_json(out / "summary.json", summary)
    return summary, rows


def train_command(args) -> int:
    options = _resolve.common(args)
    method = _resolve.method(args.method)
    if method.adaptive and args.batch_size is not None:
        # It would be recorded in config.json and ignored. (compare accepts it: there
        # it sets the baselines' batch among the methods compared.)
        baselines = ", ".join(m.name for m in METHODS.values() if not m.adaptive)
        raise UsageError(
            f"--batch-size sets the constant batch of the baselines ({baselines}); "
            f"{method.name} chooses its own, starting at --min-batch-size: leave out "
            "--batch-size, or pass --min-batch-size / --max-batch-size."
        )
    target = _resolve.target(args.target)
    checkpoint_every = _resolve.checkpoint_every(args.checkpoint_every)
    if args.resume and (args.out is None or not Path(args.out).is_dir()):
        raise UsageError(
            f"--resume needs --out with the directory of the run to continue, got "
            f"{args.out!r}; pass the --out of a run trained with --checkpoint-every."
        )
    out = _resolve.out_dir(
        args.out, f"{method.name}-{options.dataset}-{options.model}",
        args.overwrite or args.resume,
    )  # fmt: skip
    dataset = _resolve.dataset(options)
    options = _resolve.cap_at_dataset(options, dataset)
    _resolve.make_dir(out)
    if args.overwrite and not args.resume and (out / "checkpoints").exists():
        import shutil

        shutil.rmtree(out / "checkpoints")  # the replaced run's, or --resume would find them
    summary, _ = train_one(
        method, options, dataset, out, target=target, progress=not args.no_progress,
        spectrum=args.spectrum, checkpoint_every=checkpoint_every, resume=args.resume,
    )  # fmt: skip
    import jax

    if jax.process_index() != 0:  # process 0 reports for all
        return EXIT_DIVERGED if summary["diverged"] else EXIT_STOPPED.get(summary["stopped"], 0)
    print(summary_table(summary))
    print(f"run directory: {out}")
    if summary["diverged"]:
        print(
            f"diverged: {summary['diverged_because']}; try a smaller --lr than {summary['lr']:g}.",
            file=sys.stderr,
        )
        return EXIT_DIVERGED
    if summary["interrupted"]:
        resume = "" if checkpoint_every is None else f"; continue with --resume --out {out}"
        print(f"{summary['stopped']} after step {summary['steps']}{resume}.", file=sys.stderr)
        return EXIT_STOPPED[summary["stopped"]]
    return 0

"""Checks of the command's options after parsing, and the objects they name.

Each check raises `UsageError` with one line that names the option, the value, and
what to pass instead.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

from adaptive_batch._limits import MAX_REPRESENTABLE_BATCH
from adaptive_batch.cli._errors import UsageError
from adaptive_batch.cli._methods import METHODS, Method
from adaptive_batch.datasets import Dataset, load_dataset

DATASET_NAMES = ("mnist1d", "digits", "synthetic")
MODEL_NAMES = ("logreg", "mlp", "cnn")
DEFAULT_EPOCHS = 100.0
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "report.md")


@dataclasses.dataclass(frozen=True)
class Options:
    """The options shared by ``train`` and ``compare``, checked."""

    dataset: str
    model: str
    epochs: float | None
    examples: int | None
    min_batch_size: int
    max_batch_size: int
    batch_size: int
    lr: float | None
    seed: int
    devices: int
    num_samples: int | None  # MNIST-1D's size; None: its default
    evals: int
    stats_backend: str
    eta: float | None = None
    fill_buckets: bool = False
    compile_ahead: bool = True

    def budget(self, dataset: Dataset) -> int:
        """The examples budget: ``--examples``, or ``--epochs`` × training-set size."""
        if self.examples is not None:
            return self.examples
        epochs = DEFAULT_EPOCHS if self.epochs is None else self.epochs
        return max(1, math.ceil(epochs * dataset.num_train))


def method(name: str) -> Method:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; use one of {', '.join(METHODS)}.")
    return METHODS[name]


def method_list(text: str) -> list[Method]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--methods {text!r} names no method; e.g. --methods cabs,sgd.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"--methods lists {', '.join(duplicates)} twice; name each once.")
    return [method(n) for n in names]


def _positive_int(option: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise UsageError(f"{option} {value} must be >= {minimum}.")


def _batch_size(option: str, value: int) -> None:
    """1 <= value <= 2**30: the methods keep batch sizes in int32 (and a larger one would
    fail later with a traceback, or exhaust memory)."""
    _positive_int(option, value)
    if value > MAX_REPRESENTABLE_BATCH:
        raise UsageError(
            f"{option} {value} is above the largest batch size; pass a size in "
            f"[1, {MAX_REPRESENTABLE_BATCH}] (2**30)."
        )


def common(args) -> Options:
    if args.dataset not in DATASET_NAMES:
        raise UsageError(
            f"unknown dataset {args.dataset!r}; use --dataset with one of "
            f"{', '.join(DATASET_NAMES)}."
        )
    if args.model not in MODEL_NAMES:
        raise UsageError(
            f"unknown model {args.model!r}; use --model with one of {', '.join(MODEL_NAMES)}."
        )
    if args.num_samples is not None and args.dataset != "mnist1d":
        raise UsageError(
            f"--num-samples sets the size of mnist1d only; {args.dataset} has a fixed size. "
            "Leave out --num-samples, or use --dataset mnist1d."
        )
    _batch_size("--min-batch-size", args.min_batch_size)
    _batch_size("--max-batch-size", args.max_batch_size)
    if args.min_batch_size > args.max_batch_size:
        raise UsageError(
            f"--min-batch-size {args.min_batch_size} is above --max-batch-size "
            f"{args.max_batch_size}; pass a minimum <= the maximum."
        )
    batch_size = args.min_batch_size if args.batch_size is None else args.batch_size
    _batch_size("--batch-size", batch_size)
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise UsageError(f"--epochs {args.epochs} must be a positive number, e.g. --epochs 20.")
    if args.examples is not None:
        _positive_int("--examples", args.examples)
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr {args.lr} must be a positive number, e.g. --lr 0.1.")
    if args.eta is not None and not (math.isfinite(args.eta) and args.eta > 0):
        raise UsageError(f"--eta {args.eta} must be a positive number, e.g. --eta 0.5.")
    _positive_int("--evals", args.evals)
    _positive_int("--devices", args.devices)
    import jax

    available = len(jax.devices())
    if args.devices > available:
        raise UsageError(
            f"--devices {args.devices} but JAX sees {available} device(s); pass --devices "
            f"<= {available} (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{args.devices} to simulate more)."
        )
    for option, value in (("--min-batch-size", args.min_batch_size), ("--batch-size", batch_size)):
        if value % args.devices:
            raise UsageError(
                f"{option} {value} is not a multiple of --devices {args.devices}; every "
                "batch is split evenly over the devices, pass a multiple."
            )
    return Options(
        dataset=args.dataset, model=args.model, epochs=args.epochs, examples=args.examples,
        min_batch_size=args.min_batch_size, max_batch_size=args.max_batch_size,
        batch_size=batch_size, lr=args.lr, seed=args.seed, devices=args.devices,
        num_samples=args.num_samples, evals=args.evals, stats_backend=args.stats_backend,
        eta=args.eta, fill_buckets=args.fill_buckets, compile_ahead=not args.no_compile_ahead,
    )  # fmt: skip


def checkpoint_every(value: int | None) -> int | None:
    if value is not None:
        _positive_int("--checkpoint-every", value)
    return value


def target(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise UsageError(f"--target {value} must be a test accuracy in (0, 1], e.g. 0.9.")
    return value


def dataset(options: Options) -> Dataset:
    kwargs = {} if options.num_samples is None else {"num_samples": options.num_samples}
    try:
        return load_dataset(options.dataset, **kwargs)
    except ValueError as error:  # the loaders' messages name the value and the fix
        option = "--num-samples" if options.dataset == "mnist1d" else "--dataset"
        raise UsageError(f"{option}: {error}") from None


def seed_list(text: str | None) -> list[int] | None:
    """``--seeds 0,1,2``: distinct integers >= 0 (None: not given)."""
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(
            f"--seeds {text!r} must be comma-separated integers, e.g. --seeds 0,1,2."
        ) from None
    if not seeds or min(seeds) < 0:
        raise UsageError(f"--seeds {text!r} must list integers >= 0, e.g. --seeds 0,1,2.")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r} lists a seed twice; name each once.")
    return seeds


def cap_at_dataset(options: Options, dataset: Dataset) -> Options:
    """``options`` with ``max_batch_size`` at most the training set (a multiple of
    ``--devices``), said on stderr: a batch above it repeats examples within itself."""
    largest = dataset.num_train - dataset.num_train % options.devices
    if options.max_batch_size <= largest:
        return options
    if options.min_batch_size > largest:
        raise UsageError(
            f"--min-batch-size {options.min_batch_size} is above the {dataset.num_train} "
            f"training examples of {options.dataset}; pass at most {largest}."
        )
    print(
        f"note: --max-batch-size {options.max_batch_size} is above the {dataset.num_train} "
        f"training examples of {options.dataset}; using {largest} (full batch).",
        file=sys.stderr,
    )
    return dataclasses.replace(options, max_batch_size=largest)


def out_dir(out: str | None, default_stem: str, overwrite: bool) -> Path:
    """The output directory (not created yet); refuses one that holds another run."""
    if out is None:
        path = Path("runs") / f"{default_stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file; pass a directory path.")
    try:
        nonempty = path.is_dir() and any(path.iterdir())
    except OSError as error:
        raise UsageError(f"--out {path} cannot be read ({error.strerror}); pass another.") from None
    if nonempty and not overwrite:
        held = [f for f in RUN_FILES if (path / f).exists()]
        what = f"another run ({', '.join(held)})" if held else "other files"
        raise UsageError(
            f"--out {path} holds {what}; pass a new --out directory, or --overwrite to replace it."
        )
    return path


def make_dir(path: Path) -> Path:
    """Create the output directory (after every other check passed)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(
            f"--out {path} cannot be created ({error.strerror}); pass another."
        ) from None
    try:
        # An existing directory may be read-only: say so now, not with a traceback at
        # the first file. (A nameless temporary file: nothing is left behind.)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(
            f"--out {path} is not writable ({error.strerror}); pass a directory you can write to."
        ) from None
    return path

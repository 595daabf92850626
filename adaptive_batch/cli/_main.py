"""``adaptive-batch``: the command line (argument parsing and error handling).

Every mistake in the input ends in one line on stderr that says what to change, and
exit code 2, never a traceback: argparse's own errors (unknown option, bad choice) and
the checks made after parsing (min > max, an output directory that holds another run).
A file that cannot be written during the run (a full disk) ends in one line, exit 74.
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from pathlib import Path

from adaptive_batch.cli._errors import UsageError
from adaptive_batch.cli._methods import METHODS
from adaptive_batch.cli._resolve import DATASET_NAMES, DEFAULT_EPOCHS, MODEL_NAMES

#: A file of the run could not be written (EX_IOERR of sysexits.h: not 1, which a
#: Python traceback gives, so that a script can tell the two apart).
EXIT_WRITE_FAILED = 74


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows "(default: ...)" where there is a default to show (not None, not a flag)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _method_help() -> str:
    lines = ["methods (default learning rate):"]
    for m in METHODS.values():
        lines.append(f"  {m.name:<20} {m.summary} (lr {m.default_lr:g})")
    return "\n".join(lines)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset", default="mnist1d", metavar="NAME",
        help=f"built-in data set, one of {', '.join(DATASET_NAMES)} (all made offline)",
    )  # fmt: skip
    p.add_argument(
        "--model", default="cnn", metavar="NAME",
        help=f"classifier, one of {', '.join(MODEL_NAMES)} (cnn: the MNIST-1D ConvBase)",
    )  # fmt: skip
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--epochs", type=float, default=None,
        help=f"training budget in passes over the training set (default {DEFAULT_EPOCHS:g})",
    )  # fmt: skip
    budget.add_argument(
        "--examples", type=int, default=None,
        help="training budget in examples (instead of --epochs)",
    )  # fmt: skip
    p.add_argument("--min-batch-size", type=int, default=16, help="smallest batch size")
    p.add_argument(
        "--max-batch-size", type=int, default=2048, help="largest batch size (adaptive methods)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None,
        help="constant batch size of the baselines (sgd, adagrad, adagrad-norm, adam); "
        "default: --min-batch-size. Adaptive methods start at --min-batch-size (train "
        "refuses --batch-size with one; compare applies it to the baselines only)",
    )  # fmt: skip
    p.add_argument(
        "--lr", type=float, default=None,
        help="learning rate; default: the method's (listed below)",
    )  # fmt: skip
    p.add_argument(
        "--eta", type=float, default=None,
        help="tolerance of the batch-size tests (η of norm-test, adadagrad, adadagrad-norm; "
        "θ of the inner-product tests); larger = smaller batches; default: the method's",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the data order")
    p.add_argument(
        "--devices", type=int, default=1,
        help="data-parallel devices to shard each batch over (batch sizes become multiples)",
    )  # fmt: skip
    p.add_argument(
        "--num-samples", type=int, default=None,
        help="MNIST-1D size: total examples, 80%% for training (default 5000: the "
        "published 4000 / 1000 split); mnist1d only",
    )  # fmt: skip
    p.add_argument(
        "--evals", type=int, default=100, help="test-set evaluations spread over the budget"
    )
    p.add_argument(
        "--stats-backend", default="auto", choices=("auto", "fast", "vmap"),
        help="how per-example gradient statistics are computed (see per_example_stats)",
    )  # fmt: skip
    p.add_argument(
        "--fill-buckets", action="store_true",
        help="fill each batch to its pow2 bucket with real examples (faster per example; "
        "the method then sees up to 2x the batch it asked for). Default: the method's "
        "exact sizes, padded",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true",
        help="reuse an --out directory that holds an earlier run (its files are replaced)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    compiling = p.add_argument_group("compiling (each batch-size bucket has its own compiled step)")
    cache = compiling.add_mutually_exclusive_group()
    cache.add_argument(
        "--compile-cache", default=None, metavar="DIR",
        help="keep compiled steps in DIR and reuse them in later runs (JAX's persistent "
        "compilation cache). Default: $JAX_COMPILATION_CACHE_DIR if set, else "
        "~/.cache/adaptive_batch/xla ($ADAPTIVE_BATCH_CACHE/xla)",
    )  # fmt: skip
    cache.add_argument(
        "--no-compile-cache", action="store_true",
        help="compile every step anew; read and write no compilation cache",
    )  # fmt: skip
    compiling.add_argument(
        "--no-compile-ahead", action="store_true",
        help="compile a bucket's step when the run first needs it (default: the next two "
        "buckets compile on a background thread while the run trains in the current one)",
    )  # fmt: skip
    hosts = p.add_argument_group(
        "several processes (jax.distributed: one process per host; process 0 writes the files)"
    )
    hosts.add_argument(
        "--num-processes", type=int, default=None, metavar="N",
        help="processes in the run; with any of these three options the command calls "
        "jax.distributed.initialize, which detects what is left out on a known cluster",
    )  # fmt: skip
    hosts.add_argument("--process-id", type=int, default=None, metavar="I", help="this one's rank")
    hosts.add_argument(
        "--coordinator-address", default=None, metavar="HOST:PORT",
        help="address of process 0's coordinator",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="adaptive-batch",
        description="Train with a batch size chosen by the training itself (CABS, "
        "adaptive sampling tests, AdAdaGrad) on built-in data, and compare methods.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,compare}")
    sub.required = True

    train = sub.add_parser(
        "train", help="train one method; writes a run directory with metrics and plots",
        description="Train one method and write OUT/config.json, metrics.jsonl, "
        "summary.json and PNG plots. With no options: CABS on MNIST-1D with the CNN.",
        epilog=_method_help(), formatter_class=_Formatter,
    )  # fmt: skip
    train.add_argument(
        "--method", default="cabs", metavar="NAME",
        help="training method, one of " + ", ".join(METHODS),
    )  # fmt: skip
    train.add_argument(
        "--out", default=None, metavar="DIR",
        help="run directory (default: runs/<method>-<dataset>-<model>-<time>)",
    )  # fmt: skip
    train.add_argument(
        "--target", type=float, default=None,
        help="also report steps, examples and time to reach this test accuracy (0..1)",
    )  # fmt: skip
    train.add_argument(
        "--spectrum", action="store_true",
        help="after training, estimate the Hessian spectrum of the trained model by "
        "stochastic Lanczos quadrature on 1000 training examples: OUT/spectrum.png and "
        "top_eigenvalue in summary.json",
    )  # fmt: skip
    train.add_argument(
        "--checkpoint-every", type=int, default=None, metavar="N",
        help="save a checkpoint (Orbax, in OUT/checkpoints) every N steps and after the "
        "last; a killed or interrupted run continues exactly with --resume",
    )  # fmt: skip
    train.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its newest checkpoint; pass the same options",
    )  # fmt: skip
    _add_common(train)

    compare = sub.add_parser(
        "compare", help="train several methods on the same examples budget; writes report.md",
        description="Train each method with the same examples budget and write "
        "OUT/report.md (a table: final test accuracy; steps, examples and wall time to "
        "reach --target), overlay plots, and one run directory per method.",
        epilog=_method_help(), formatter_class=_Formatter,
    )  # fmt: skip
    compare.add_argument(
        "--methods", default="cabs,sgd,adadagrad,adagrad", metavar="LIST",
        help="comma-separated methods, one of each: " + ", ".join(METHODS),
    )  # fmt: skip
    compare.add_argument(
        "--out", default=None, metavar="DIR",
        help="output directory (default: runs/compare-<dataset>-<model>-<time>)",
    )  # fmt: skip
    compare.add_argument(
        "--seeds", default=None, metavar="LIST",
        help="comma-separated seeds, e.g. 0,1,2: every method runs once per seed (into "
        "OUT/<method>/seed-<seed>), and report.md / report.json give each figure's mean "
        "and range over them (default: the one --seed)",
    )  # fmt: skip
    compare.add_argument(
        "--target", type=float, default=0.9,
        help="test accuracy (0..1) to measure steps, examples and time to",
    )  # fmt: skip
    _add_common(compare)
    return parser


def _initialize_processes(args) -> None:
    """``jax.distributed.initialize`` when any of the multi-process options is given."""
    given = {
        "coordinator_address": args.coordinator_address,
        "num_processes": args.num_processes,
        "process_id": args.process_id,
    }
    if all(value is None for value in given.values()):
        return
    if args.num_processes is not None and args.num_processes < 1:
        raise UsageError(f"--num-processes {args.num_processes} must be >= 1.")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or 2**31):
        raise UsageError(
            f"--process-id {args.process_id} must be in [0, --num-processes {args.num_processes})."
        )
    import jax

    # CPU devices of several processes talk through Gloo (no effect on GPUs and TPUs).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**given)
    except (RuntimeError, ValueError) as error:
        raise UsageError(
            f"jax.distributed.initialize failed ({error}); pass --coordinator-address, "
            "--num-processes and --process-id (JAX detects them only on known clusters)."
        ) from None


def _compile_cache(args) -> None:
    if args.no_compile_cache:  # (argparse refuses it beside --compile-cache)
        return
    from adaptive_batch.cli._compile_cache import default_directory, use_compile_cache

    directory = default_directory() if args.compile_cache is None else Path(args.compile_cache)
    if directory.exists() and not directory.is_dir():
        raise UsageError(
            f"--compile-cache {directory} is a file; pass a directory, or --no-compile-cache."
        )
    use_compile_cache(directory)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``adaptive-batch`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    with warnings.catch_warnings():
        warnings.showwarning = _one_line(prog)
        return _run_command(args, prog)


def _one_line(prog: str):
    """Warnings as one line each, like the command's errors (not a source line)."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr)

    return show


def _run_command(args, prog: str) -> int:
    try:
        _initialize_processes(args)
        _compile_cache(args)
        if args.command == "train":
            from adaptive_batch.cli._train import train_command

            return train_command(args)
        from adaptive_batch.cli._compare import compare_command

        return compare_command(args)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # a full disk, a file system gone read-only, ...
        where = f": {error.filename}" if error.filename else ""
        fix = "free some space" if error.errno == errno.ENOSPC else "fix that"
        print(
            f"{prog}: error: {error.strerror or error}{where}; the run stopped there. "
            f"{fix.capitalize()}, then run again with --overwrite.",
            file=sys.stderr,
        )
        return EXIT_WRITE_FAILED

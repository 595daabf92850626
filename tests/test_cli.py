"""The `adaptive-batch` command: help, a tiny train and compare, and bad inputs."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest
from _cli import main_in_process

from adaptive_batch.cli._methods import METHODS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_PLOTS = ["loss_vs_examples", "loss_vs_time", "accuracy_vs_examples", "accuracy_vs_time",
             "batch_size", "learning_rate", "overview"]  # fmt: skip
# A small, fast problem: 4-class Gaussian data, logistic regression, a few hundred examples.
TINY = ["--dataset", "synthetic", "--model", "logreg", "--examples", "640", "--evals", "4",
        "--min-batch-size", "8", "--max-batch-size", "64", "--no-progress"]  # fmt: skip


def _run(argv, capsys):
    try:
        code = main_in_process(argv)
    except SystemExit as exit_:  # argparse exits for --help and parse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC, path


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["compare", "--help"]])
def test_help_lists_every_option_with_defaults(argv, capsys):
    code, out, _ = _run(argv, capsys)
    assert code == 0
    if argv == ["--help"]:
        assert "train" in out and "compare" in out
        return
    for option in ["--method" if argv[0] == "train" else "--methods", "--dataset", "--model",
                   "--epochs", "--examples", "--min-batch-size", "--max-batch-size", "--lr",
                   "--seed", "--out", "--devices", "--target"]:  # fmt: skip
        assert option in out, option
    assert "(default: 16)" in out and "(default: 2048)" in out and "(default: mnist1d)" in out
    for name in METHODS:
        assert name in out


def test_train_writes_the_run_directory(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = _run(["train", *TINY, "--out", str(out_dir), "--target", "0.5"], capsys)
    assert code == 0, err
    config = json.loads((out_dir / "config.json").read_text())
    assert config["method"] == "cabs" and config["dataset"] == "synthetic"
    assert config["examples_budget"] == 640 and config["lr"] == METHODS["cabs"].default_lr
    assert config["min_batch_size"] == 8 and config["max_batch_size"] == 64

    rows = _read_jsonl(out_dir / "metrics.jsonl")
    for row in rows:
        assert {"step", "batch_size", "padded_size", "loss", "examples", "wall_time",
                "learning_rate", "skipped_steps"} <= row.keys()  # fmt: skip
        assert 8 <= row["batch_size"] <= 64
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    # Examples add up batch by batch and stop exactly at the budget.
    running = 0
    for row in rows:
        running += row["batch_size"]
        assert row["examples"] == running
    assert running == 640
    assert all(b["wall_time"] >= a["wall_time"] for a, b in itertools.pairwise(rows))
    evals = [r for r in rows if "test_accuracy" in r]

    # At steps 1, 2, 4, 8, ... and at each step that crosses a multiple of 640 / 4 examples.
    def crosses_mark(row):
        before = row["examples"] - row["batch_size"]
        return any(before < mark <= row["examples"] for mark in (160, 320, 480, 640))

    expected = [r["step"] for r in rows if r["step"] & (r["step"] - 1) == 0 or crosses_mark(r)]
    assert [r["step"] for r in evals] == expected
    assert evals[-1] is rows[-1]

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == len(rows) and summary["examples"] == 640
    assert summary["test_accuracy"] == evals[-1]["test_accuracy"]
    assert summary["final_batch_size"] >= rows[-1]["batch_size"]  # the last may be cut short
    assert summary["wall_time_s"] == pytest.approx(rows[-1]["wall_time"])
    assert summary["final_train_loss"] > 0 and summary["test_accuracy"] > 0.4  # chance: 0.25
    first = next(r for r in evals if r["test_accuracy"] >= 0.5)
    assert summary["to_target"]["steps"] == first["step"]
    for name in RUN_PLOTS:
        _png(out_dir / f"{name}.png")
    # The terminal table, with the numbers of summary.json.
    assert "test accuracy" in out and f"{summary['test_accuracy']:.1%}" in out
    assert f"{summary['steps']:,}" in out and "final batch size" in out


def test_fill_buckets_option_runs_bucket_sizes(tmp_path, capsys):
    sizes = {}
    for flag in ([], ["--fill-buckets"]):
        out_dir = tmp_path / ("filled" if flag else "exact")
        argv = ["train", *TINY, "--method", "norm-test", "--eta", "1.0", "--out", str(out_dir)]
        code, _, err = _run([*argv, *flag], capsys)
        assert code == 0, err
        assert json.loads((out_dir / "config.json").read_text())["fill_buckets"] == bool(flag)
        rows = _read_jsonl(out_dir / "metrics.jsonl")
        sizes[bool(flag)] = [r["batch_size"] for r in rows[:-1]]  # the last may be cut short
    buckets = {8, 16, 32, 64}
    assert set(sizes[True]) <= buckets  # filled: every batch is a whole bucket
    assert not set(sizes[False]) <= buckets  # exact sizes: the rule's own, in between


def test_train_baseline_uses_constant_batch_and_two_devices(tmp_path, capsys):
    out_dir = tmp_path / "sgd"
    argv = ["train", *TINY, "--method", "sgd", "--batch-size", "32", "--devices", "2",
            "--out", str(out_dir)]  # fmt: skip
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    rows = _read_jsonl(out_dir / "metrics.jsonl")
    assert {r["batch_size"] for r in rows} == {32}
    assert len(rows) == 640 // 32


def test_compare_writes_report_with_table(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    # --batch-size sets the baselines' batch (train refuses it for an adaptive method).
    argv = ["compare", *TINY, "--methods", "cabs,sgd", "--target", "0.5", "--batch-size", "16",
            "--out", str(out_dir)]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert {r["batch_size"] for r in _read_jsonl(out_dir / "sgd" / "metrics.jsonl")} == {16}
    assert _read_jsonl(out_dir / "cabs" / "metrics.jsonl")[0]["batch_size"] == 8
    summaries = json.loads((out_dir / "summary.json").read_text())
    assert list(summaries) == ["cabs", "sgd"]
    report = (out_dir / "report.md").read_text()
    lines = report.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    assert "final test acc" in lines[header] and "steps to 50%" in lines[header]
    assert "examples to 50%" in lines[header] and "time to 50%" in lines[header]
    table = [line.split("|")[1:-1] for line in lines[header + 2 : header + 4]]
    for cells, name in zip(table, ["cabs", "sgd"], strict=True):
        s = summaries[name]
        assert cells[0].strip() == name
        assert cells[3].strip() == f"{s['test_accuracy']:.1%}"
        reached = s["to_target"]
        assert cells[4].strip() == ("—" if reached is None else f"{reached['steps']:,}")
        assert s["examples"] == 640  # the same budget for every method
        assert (out_dir / name / "metrics.jsonl").exists()
    for name in ["compare_accuracy_vs_steps", "compare_accuracy_vs_examples",
                 "compare_accuracy_vs_time", "compare_batch_size", "compare_overview"]:  # fmt: skip
        _png(out_dir / f"{name}.png")
        assert f"({name}.png)" in report
    assert "cabs" in out and "sgd" in out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["train", "--method", "lbfgs"], "unknown method 'lbfgs'"),
        (["train", "--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["train", "--model", "resnet"], "unknown model 'resnet'"),
        (["train", "--min-batch-size", "64", "--max-batch-size", "16"], "--min-batch-size 64"),
        (["train", "--min-batch-size", "0"], "--min-batch-size 0 must be >= 1"),
        (["train", "--epochs", "-1"], "--epochs -1.0 must be a positive"),
        (["train", "--lr", "0"], "--lr 0.0 must be a positive"),
        (["train", "--devices", "64"], "--devices 64 but JAX sees"),
        (["train", "--num-samples", "123"], "multiple of 10"),
        (["train", "--dataset", "digits", "--num-samples", "900"], "mnist1d only; digits"),
        (["train", "--target", "1.5"], "--target 1.5"),
        (["compare", "--methods", "cabs,cabs"], "lists cabs twice"),
        (["compare", "--methods", "cabs,nope"], "unknown method 'nope'"),
        (["train", "--epochs", "1", "--examples", "5"], "not allowed with argument"),
        (["train", "--min-batch-size", "many"], "invalid int value: 'many'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, says, capsys, tmp_path):
    code, out, err = _run([*argv, "--out", str(tmp_path / "x")] if argv[0] != "frobnicate"
                          else argv, capsys)  # fmt: skip
    assert code == 2
    assert says in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "fix" not in out
    assert not (tmp_path / "x").exists()  # nothing created before the checks passed


def test_out_dir_holding_another_run_is_refused(tmp_path, capsys):
    out_dir = tmp_path / "held"
    out_dir.mkdir()
    (out_dir / "config.json").write_text("{}")
    code, _, err = _run(["train", *TINY, "--out", str(out_dir)], capsys)
    assert code == 2
    assert "holds another run (config.json)" in err and "--overwrite" in err
    assert (out_dir / "config.json").read_text() == "{}"  # untouched


def test_console_entry_point_exit_code(tmp_path):
    """``python -m adaptive_batch`` as a user runs it: exit 2, one line, no traceback."""
    env = dict(os.environ, ADAPTIVE_BATCH_CACHE=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "adaptive_batch", "train", "--method", "sdg"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "adaptive-batch train: error: unknown method 'sdg'; use one of " + ", ".join(METHODS) + "."
    )


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_on_a_tiny_budget(name, tmp_path):
    """Each method's optimizer and statistics fit together (a few steps, logreg)."""
    from adaptive_batch.cli._run import RunConfig, run
    from adaptive_batch.datasets import make_synthetic
    from adaptive_batch.models import functional, make_model

    ds = make_synthetic(num_train=256, num_test=64, dim=8, num_classes=3)
    fns = functional(make_model("logreg", ds.input_shape, ds.num_classes))
    # min = max: one compiled shape per method keeps this fast.
    config = RunConfig(METHODS[name], METHODS[name].default_lr, 8, 8, 8, 32, evals=1)
    summary, rows, params = run(fns, ds, config, tmp_path, progress=False)
    assert summary["examples"] == 32 and summary["steps"] == 4 and not summary["diverged"]
    chex.assert_trees_all_equal_shapes(params, fns.params)  # the trained parameters
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert ("suggested_batch_size" in rows[0]) == METHODS[name].adaptive
    if METHODS[name].adaptive:
        assert all(r["suggested_batch_size"] == 8 for r in rows)  # clipped to the bounds


# --------------------------------------------------------------------------- --spectrum


def test_train_spectrum_writes_plot_and_top_eigenvalue(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = _run(["train", *TINY, "--out", str(out_dir), "--spectrum"], capsys)
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["spectrum_plot"] == "spectrum.png" and "spectrum.png" in summary["plots"]
    assert (out_dir / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Softmax regression is convex: a positive, finite top eigenvalue.
    assert 0 < summary["top_eigenvalue"] < 1e6
    assert "Hessian λ_max" in out


def test_spectrum_top_eigenvalue_matches_dense_hessian(tmp_path):
    """The reported λ_max against eigh of the dense float64 Hessian, same examples."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from adaptive_batch.cli._spectrum import SPECTRUM_EXAMPLES, write_spectrum
    from adaptive_batch.datasets import load_dataset
    from adaptive_batch.models import functional, make_model

    dataset = load_dataset("synthetic")
    fns = functional(make_model("logreg", dataset.input_shape, dataset.num_classes, seed=1))
    result = write_spectrum(fns, fns.params, dataset, tmp_path)
    size = min(SPECTRUM_EXAMPLES, dataset.num_train)
    assert result["spectrum_examples"] == size
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), fns.params)
        flat, unravel = ravel_pytree(params64)
        batch = jax.tree.map(
            lambda x: jnp.asarray(x[:size], jnp.float64 if x.dtype.kind == "f" else x.dtype),
            dataset.train,
        )
        hessian = jax.jit(jax.hessian(lambda w: jnp.mean(fns.loss_fn(unravel(w), batch))))(flat)
        dense_top = np.linalg.eigvalsh(np.asarray(hessian))[-1]
    assert result["top_eigenvalue"] == pytest.approx(dense_top, rel=1e-3)


def test_report_calls_a_tie_a_tie():
    from adaptive_batch.cli._report import report_markdown

    def summary(steps):
        reached = {"steps": steps, "examples": 10 * steps, "wall_time_s": 0.5}
        return {"lr": 0.3, "tolerance": None, "test_accuracy": 0.93, "steps": 900,
                "final_batch_size": 16, "wall_time_s": 1.0, "to_target": reached}  # fmt: skip

    def verdict(**steps):
        report = report_markdown({n: summary(s) for n, s in steps.items()}, title="t",
                                 target=0.9, budget=1000, plots=[])  # fmt: skip
        return next(line for line in report.splitlines() if line.startswith("Fewest"))

    assert verdict(cabs=102, sgd=102) == (
        "Fewest optimizer steps to 90%: **cabs** and **sgd** (102 each, a tie)."
    )
    assert verdict(cabs=102, sgd=103) == "Fewest optimizer steps to 90%: **cabs** (102)."


def test_compare_over_seeds_reports_means_and_ranges(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = _run(
        ["compare", *TINY, "--methods", "norm-test,sgd", "--seeds", "0,1,2", "--target", "0.3",
         "--out", str(out)], capsys,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1, 2] and set(report["methods"]) == {"norm-test", "sgd"}
    for name, entry in report["methods"].items():
        runs = entry["seeds"]
        assert [r["seed"] for r in runs] == [0, 1, 2]
        for seed, run in zip([0, 1, 2], runs, strict=True):  # each run's own files agree
            on_disk = json.loads((out / name / f"seed-{seed}" / "summary.json").read_text())
            assert on_disk["test_accuracy"] == run["test_accuracy"]
            assert (
                json.loads((out / name / f"seed-{seed}" / "config.json").read_text())["seed"]
                == seed
            )
        accuracies = [r["test_accuracy"] for r in runs]
        assert len(set(accuracies)) > 1  # the seeds differ
        figure = entry["test_accuracy"]
        assert figure["min"] == min(accuracies) and figure["max"] == max(accuracies)
        assert figure["mean"] == pytest.approx(np.mean(accuracies))
        reached = [r for r in runs if r["to_target"]]
        assert entry["reached"] == len(reached) and entry["num_seeds"] == 3
        if reached:
            steps = [r["to_target"]["steps"] for r in reached]
            assert entry["steps_to_target"]["mean"] == pytest.approx(np.mean(steps))
    text = (out / "report.md").read_text()
    low, high = (
        f"{100 * report['methods']['sgd']['test_accuracy'][k]:.1f}" for k in ("min", "max")
    )
    assert f"({low}–{high}) %" in text and "once per seed (0, 1, 2" in text
    assert "norm-test" in stdout and "seeds reaching" in stdout


@pytest.mark.parametrize("seeds", ["0,x", "0,0", "-1", ","])
def test_bad_seeds_are_one_line(seeds, tmp_path, capsys):
    code, _, err = _run(["compare", *TINY, "--seeds", seeds, "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--seeds" in err


def test_noise_scale_is_recorded_and_drawn_beside_the_batch_size(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(["train", *TINY, "--method", "norm-test", "--out", str(out)], capsys)
    assert code == 0, err
    rows = [r for r in _read_jsonl(out / "metrics.jsonl") if "step" in r]
    assert all(r["noise_scale"] >= 0 for r in rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adaptive_batch.cli import _plots

    fig, ax = plt.subplots()
    _plots._batch_panel(ax, rows)
    labels = [line.get_label() for line in ax.get_lines()]
    assert "noise scale tr Σ / ‖ḡ‖² (smoothed)" in labels and "asked by the rule" in labels
    plt.close(fig)

"""`fit` under ``jax.distributed``: 2 processes x 2 CPU devices take the same steps as 1
process x 4 devices, only process 0 writes the metrics, and a 2-process run killed
with SIGKILL resumes from its collective checkpoint to the same run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _kill import count_rows, read_rows, without

WORKER = Path(__file__).with_name("_fit_multiprocess_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(num_processes, out, resume=False):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = str(_free_port())
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(num_processes),
                str(i),
                port,
                str(out),
                *(["--resume"] if resume else []),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]


def finish(processes):
    try:
        logs = [p.communicate(timeout=240)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, log in zip(processes, logs, strict=True):
        assert p.returncode == 0, log[-3000:]


def params(out, process_id=0):
    with np.load(out / f"params-{process_id}.npz") as f:
        return [f[name] for name in f.files]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit_multiprocess")
    single, double = start(1, tmp / "single"), start(2, tmp / "double")
    finish(single)
    finish(double)
    return tmp


def test_two_processes_take_the_steps_of_one(runs):
    one, two = (
        read_rows(runs / "single" / "metrics.jsonl"),
        read_rows(runs / "double" / "metrics.jsonl"),
    )
    assert [r["step"] for r in two] == list(range(1, 61))  # process 0 alone wrote, once each
    assert [r["batch_size"] for r in two] == [r["batch_size"] for r in one]
    assert len({r["batch_size"] for r in one}) > 3  # the norm test grew the batch
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], atol=1e-5)
    for a, b in zip(params(runs / "double", 0), params(runs / "double", 1), strict=True):
        np.testing.assert_array_equal(a, b)  # every process holds the same parameters
    for a, b in zip(params(runs / "double"), params(runs / "single"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_two_processes_killed_resume_to_the_same_run(runs, tmp_path):
    out = tmp_path / "killed"
    processes = start(2, out)
    deadline = time.monotonic() + 240
    while count_rows(out / "metrics.jsonl") < 25:
        assert all(p.poll() is None for p in processes) and time.monotonic() < deadline
        time.sleep(0.002)
    for p in processes:
        p.send_signal(signal.SIGKILL)
    for p in processes:
        p.wait(timeout=60)
    killed_at = count_rows(out / "metrics.jsonl")
    assert 25 <= killed_at < 60
    finish(start(2, out, resume=True))
    expected, got = read_rows(runs / "double" / "metrics.jsonl"), read_rows(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 61))
    assert without(got) == without(expected)
    for a, b in zip(params(out), params(runs / "double"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_command_on_two_processes_takes_the_steps_of_one(tmp_path):
    """``adaptive-batch train --num-processes 2`` (2 CPU devices each) against one process
    with 4 devices: same batch sizes, losses to 1e-5; process 0 alone writes and prints."""
    args = ["-m", "adaptive_batch", "train", "--dataset", "synthetic", "--model", "mlp",
            "--examples", "3000", "--evals", "2", "--min-batch-size", "8",
            "--max-batch-size", "128", "--method", "norm-test", "--eta", "0.5",
            "--devices", "4", "--no-progress"]  # fmt: skip

    def env(devices):
        return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}

    single = subprocess.Popen([sys.executable, *args, "--out", str(tmp_path / "one")],
                              env=env(4), stdout=subprocess.PIPE, text=True)  # fmt: skip
    port = str(_free_port())
    double = [
        subprocess.Popen(
            [
                sys.executable,
                *args,
                "--out",
                str(tmp_path / "two"),
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--coordinator-address",
                f"localhost:{port}",
            ],
            env=env(2),
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in [single, *double]]
    assert [p.returncode for p in [single, *double]] == [0, 0, 0]
    assert "run directory" in outputs[1] and "run directory" not in outputs[2]
    one, two = (
        read_rows(tmp_path / "one" / "metrics.jsonl"),
        read_rows(tmp_path / "two" / "metrics.jsonl"),
    )
    assert [r["batch_size"] for r in two] == [r["batch_size"] for r in one]
    assert len({r["batch_size"] for r in one}) > 3
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], atol=1e-5)

"""Multi-host placement: a Loader whose sharding spans two JAX processes (CPU, Gloo).

Each process must hold exactly its rows of the batch a single-process Loader gives
(same seed), read only the examples of those rows, and the global arrays must be
usable in a computation over both processes.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adaptive_batch import BatchPlan
from adaptive_batch.data import Loader

WORKER = Path(__file__).with_name("_multiprocess_loader_worker.py")
NUM_EXAMPLES, SEED = 50, 3
PLANS = [(5, 8), (8, 8), (30, 32), (2, 4), (40, 40)]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker_outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(tmp / f"{i}.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return [json.loads((tmp / f"{i}.json").read_text()) for i in range(2)]


def _reference_ids():
    """The batches of one process with no sharding: ids, padding rows 0."""
    source = [{"id": np.int32(i), "x": np.full(3, i, np.float32)} for i in range(NUM_EXAMPLES)]
    with Loader(source, seed=SEED) as loader:
        return [loader.next(BatchPlan(*plan)) for plan in PLANS]


def test_each_process_holds_its_rows_of_the_single_process_batch(worker_outputs):
    reference = _reference_ids()
    for process, out in enumerate(worker_outputs):
        for batch, ref, (size, padded) in zip(out["batches"], reference, PLANS, strict=True):
            assert batch["shape"] == [padded, 3] and batch["batch_size"] == size
            rows = padded // 2  # the process's block: 2 of the 4 devices
            start = process * rows
            shards = dict((s, ids) for s, ids in batch["ids"])
            held = [i for s in sorted(shards) for i in shards[s]]
            assert min(shards) == start
            assert held == ref.data["id"][start : start + rows].tolist()
            mask = [m for _, ms in batch["mask"] for m in ms]
            assert mask == ref.mask[start : start + rows].tolist()
            assert [v for xs in batch["x_first_column"] for v in xs] == [float(i) for i in held]
            # A computation over both processes sees the whole batch.
            assert batch["global_masked_sum"] == int(ref.data["id"][:size].sum())


def test_each_process_reads_only_its_own_examples(worker_outputs):
    reference = _reference_ids()
    for process, out in enumerate(worker_outputs):
        own = set()
        for ref, (_, padded) in zip(reference, PLANS, strict=True):
            rows = padded // 2
            real = ref.data["id"][: ref.batch_size].tolist()
            mine = real[process * rows : (process + 1) * rows]
            # A process that holds only padding reads the batch's first example, for
            # the structure of its (zeroed) rows.
            own |= set(mine) if mine else {real[0]}
        assert set(out["read"]) == own
    # Between them, the processes read every example of every batch.
    every = {i for ref in reference for i in ref.data["id"][: ref.batch_size].tolist()}
    assert set(worker_outputs[0]["read"]) | set(worker_outputs[1]["read"]) == every

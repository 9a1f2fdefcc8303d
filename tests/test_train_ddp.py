"""Data parallelism: 2 processes (gloo on CPU, launched like on a cluster) with global batch B end where 1 process with
batch B ends, for every architecture; the partitioned global batch does not depend on the number of ranks."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.config.train import TrainRunConfig
from pipeline.store import ActivationDataset
from pipeline.train import checkpoint as ckpt
from pipeline.train.data import PartitionedBatches, owned_partitions
from pipeline.errors import ConfigError
from pipeline.train.trainer import Trainer

from helpers.tiny_training import tiny_dataset, write_tiny_config

SIGNALLED_TRAIN = str(Path(__file__).resolve().parent / "helpers" / "signalled_train.py")

STEPS = 50
# Each arch with the paths that must stay in lockstep across ranks: AuxK on dead latents (all-reduced firing stats),
# BatchTopK's global threshold, relu_2023's resampling (same sample and seed everywhere).
ARCH_OVERRIDES = {
    "topk": ["sae.arch=topk"],
    "batchtopk": ["sae.arch=batchtopk"],
    "relu_2023": ["sae.arch=relu_2023", "train.lr=0.01", "sae.resample={every_steps: 20, window_steps: 2, sample_inputs: 512}"],
    "relu_2024": ["sae.arch=relu_2024"],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def write_config(path: Path, dataset: Path, run_dir: Path) -> Path:
    return write_tiny_config(path, dataset, run_dir, steps=STEPS, log_every=10, eval_rows=256,
                             checkpoint={"every_steps": 1000})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, overrides: list[str], processes: int, launcher: str = "torchrun",
           signal_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # with signal_at ("STEP" or "STEP@RANK"), the same CLI run sends itself SIGTERM right after that step
    train = (["-m", "pipeline.cli.main", "train"] if signal_at is None else [SIGNALLED_TRAIN, signal_at]) + \
        [str(config), *overrides]
    if processes == 1:
        cmd = [sys.executable, *train]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *train]
    else:  # accelerate's launcher; on a CPU-only machine --multi_gpu still runs N gloo processes via torchrun
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), *train]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / ckpt.step_dir_name(STEPS) / "sae.safetensors"))


@pytest.mark.parametrize("arch", list(ARCH_OVERRIDES))
def test_two_processes_match_one(arch, dataset, tmp_path):
    overrides = ARCH_OVERRIDES[arch]
    single = launch(write_config(tmp_path / "one.yaml", dataset, tmp_path / "one"), overrides, 1)
    assert single.returncode == 0, single.stderr
    launcher = "accelerate" if arch == "topk" else "torchrun"
    double = launch(write_config(tmp_path / "two.yaml", dataset, tmp_path / "two"), overrides, 2, launcher)
    assert double.returncode == 0, double.stderr
    assert "on 2 process(es)" in double.stderr  # really distributed, not one process doing everything

    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        rel = ((one[name] - two[name]).abs().max() / one[name].abs().max()).item()
        print(f"{arch} {name}: max|Δw|/max|w| = {rel:.2e}")
        assert rel <= 1e-4, f"{arch} {name}: max|Δw|/max|w| = {rel:.2e}"
    # Guard against a vacuous pass: the weights moved away from their initialisation.
    assert not torch.equal(one["W_enc"], one["W_dec"].T)
    if arch == "relu_2023":  # the same latents were revived in both runs
        revived = re.compile(r"resampled ([1-9]\d*) dead latents \(round")
        assert revived.findall(single.stderr) and revived.findall(single.stderr) == revived.findall(double.stderr)


def test_a_signal_to_one_rank_checkpoints_all_and_resumes_exactly(dataset, tmp_path):
    """Only rank 1 gets SIGTERM; both agree to checkpoint the same step and stop; the resumed pair ends bit-identical
    to a pair that was never interrupted."""
    straight = launch(write_config(tmp_path / "a.yaml", dataset, tmp_path / "straight"), ["train.steps=30"], 2)
    assert straight.returncode == 0, straight.stderr
    config = write_config(tmp_path / "b.yaml", dataset, tmp_path / "stopped")
    stopped = launch(config, ["train.steps=30"], 2, signal_at="12@1")
    # Both ranks exit with EXIT_PREEMPTED; torchrun itself then reports a failed worker, so look at the run instead.
    assert "checkpointed step 12" in stopped.stderr, stopped.stderr
    root = tmp_path / "stopped" / "checkpoints"
    assert ckpt.list_checkpoints(root)[0].name == ckpt.step_dir_name(12)
    assert ckpt.verify(root / ckpt.step_dir_name(12)) is None
    assert sorted(p.name for p in (root / ckpt.step_dir_name(12) / "rng").iterdir()) == [
        "rank_0.json", "rank_0.safetensors", "rank_1.json", "rank_1.safetensors"]
    resumed = launch(config, ["train.steps=30", "--resume"], 2)
    assert resumed.returncode == 0, resumed.stderr
    final = ckpt.step_dir_name(30)
    for name in ("sae.safetensors", "optimizer.safetensors", "firing.safetensors"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / final / name))
        b = load_file(str(root / final / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_global_batch_does_not_depend_on_world_size(dataset):
    ds = ActivationDataset.open(dataset)
    shards = [0, 1, 2, 3]
    kwargs = dict(global_batch=64, partitions=4, seed=3)
    whole = PartitionedBatches(ds, shards, rank=0, world_size=1, **kwargs)
    halves = [PartitionedBatches(ds, shards, rank=r, world_size=2, **kwargs) for r in range(2)]
    assert [h.owned for h in halves] == [[0, 2], [1, 3]]
    for _ in range(3):
        by_partition = dict(zip(whole.owned, next(whole).split(16)))
        for half in halves:
            for p, part in zip(half.owned, next(half).split(16)):
                assert torch.equal(part, by_partition[p])
    for it in (whole, *halves):
        it.close()


def test_world_size_must_divide_partitions():
    assert owned_partitions(8, 1, 4) == [1, 5]
    with pytest.raises(ConfigError, match="data.partitions 8 must be a multiple of the number of processes 3"):
        owned_partitions(8, 0, 3)


def test_reader_position_is_saved_per_partition(dataset, tmp_path):
    """A checkpoint holds one reader state per partition, which is what lets a resume change the world size."""
    cfg = load_config(TrainRunConfig, write_config(tmp_path / "c.yaml", dataset, tmp_path / "run"),
                      ["data.partitions=4", "train.steps=3"])
    with Trainer(cfg) as trainer:
        result = trainer.fit()
    reader = result.checkpoint / "reader"
    assert sorted(p.name for p in reader.iterdir()) == [f"partition_{p}.json" for p in range(4)]
    assert all(ckpt.load_component(result.checkpoint, f"reader/partition_{p}")["rows_seen"] == 3 * 32 for p in range(4))

"""Exact resume: a run killed by SIGTERM (through the real handler) at N/3 and 2N/3 and resumed each time ends with
bit-identical weights to an uninterrupted run; corrupt or partial checkpoints are skipped; nothing is unpickled."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.config.train import TrainRunConfig
from pipeline.train import checkpoint as ckpt
from pipeline.train.signals import EXIT_PREEMPTED, SIGNAL_AT_STEP_ENV
from pipeline.train.trainer import Trainer
from tiny_training import tiny_dataset, write_tiny_config

STEPS = 30
# Small enough to be quick, shaped so that every state-carrying path runs: dead latents (AuxK, firing stats),
# relu_2023 resampling across a resume boundary, batchtopk's threshold buffers, relu_2024's λ warmup.
ARCH_OVERRIDES = {
    "topk": ["sae.arch=topk", "sae.k=2"],
    "batchtopk": ["sae.arch=batchtopk", "sae.k=2"],
    "relu_2023": ["sae.arch=relu_2023", "train.lr=0.01", "sae.resample={every_steps: 8, window_steps: 2, sample_inputs: 512}"],
    "relu_2024": ["sae.arch=relu_2024", "sae.l1_warmup_frac=0.5"],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def write_config(path: Path, dataset: Path, run_dir: Path) -> Path:
    return write_tiny_config(path, dataset, run_dir, steps=STEPS, log_every=5, eval_rows=512,
                             checkpoint={"every_steps": 4, "keep_last": 3})


def saepipe_train(config: Path, *args: str, signal_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(SIGNAL_AT_STEP_ENV, None)
    if signal_at is not None:
        env[SIGNAL_AT_STEP_ENV] = str(signal_at)
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", "train", str(config), *args],
                          env=env, capture_output=True, text=True, timeout=120)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / ckpt.step_dir_name(STEPS)
    return {**load_file(str(path / "sae.safetensors")), **{f"opt.{k}": v for k, v in load_file(str(path / "optimizer.safetensors")).items()}}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def metric_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


@pytest.mark.parametrize("arch", list(ARCH_OVERRIDES))
def test_sigterm_twice_and_resume_is_bit_identical(arch, dataset, tmp_path):
    overrides = ARCH_OVERRIDES[arch]
    straight = write_config(tmp_path / "straight.yaml", dataset, tmp_path / "straight")
    done = saepipe_train(straight, *overrides)
    assert done.returncode == 0, done.stderr

    interrupted = write_config(tmp_path / "interrupted.yaml", dataset, tmp_path / "interrupted")
    first = saepipe_train(interrupted, *overrides, signal_at=STEPS // 3)
    assert first.returncode == EXIT_PREEMPTED, first.stderr
    assert ckpt.list_checkpoints(tmp_path / "interrupted" / "checkpoints")[0].name == ckpt.step_dir_name(STEPS // 3)
    second = saepipe_train(interrupted, *overrides, "--resume", signal_at=2 * STEPS // 3)
    assert second.returncode == EXIT_PREEMPTED, second.stderr
    third = saepipe_train(interrupted, "--resume", *overrides)
    assert third.returncode == 0, third.stderr

    assert_bit_identical(final_state(tmp_path / "straight"), final_state(tmp_path / "interrupted"))
    exported = [load_file(str(tmp_path / run / "final" / "sae.safetensors")) for run in ("straight", "interrupted")]
    assert_bit_identical(*exported)
    # Every logged step once, although the killed runs logged past nothing and the resumes appended.
    assert metric_steps(tmp_path / "interrupted") == metric_steps(tmp_path / "straight") == list(range(5, STEPS + 1, 5))
    if arch == "relu_2023":  # resampling rounds at steps 8, 16, 24 fall in all three runs; some revive latents
        assert re.search(r"resampled [1-9]\d* dead latents \(round", first.stderr + second.stderr + third.stderr)
    if arch == "topk":  # AuxK ran: latents were dead at some point, so restoring firing stats mattered
        records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("aux", 0) > 0 for r in records)


def test_corrupt_and_partial_checkpoints_are_skipped(dataset, tmp_path):
    straight = write_config(tmp_path / "straight.yaml", dataset, tmp_path / "straight")
    assert saepipe_train(straight).returncode == 0

    config = write_config(tmp_path / "broken.yaml", dataset, tmp_path / "broken")
    assert saepipe_train(config, signal_at=20).returncode == EXIT_PREEMPTED
    root = tmp_path / "broken" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == [ckpt.step_dir_name(s) for s in (20, 16, 12)]
    # Newest: one flipped byte inside the weights. Next: the manifest never got written (killed mid-save).
    weights = root / ckpt.step_dir_name(20) / "sae.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    (root / ckpt.step_dir_name(16) / ckpt.MANIFEST).unlink()

    resumed = saepipe_train(config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping checkpoint" in resumed.stderr and "checksum" in resumed.stderr and "no manifest" in resumed.stderr
    assert "resumed from" in resumed.stderr and ckpt.step_dir_name(12) in resumed.stderr
    # Replaying from step 12 is as exact as from anywhere else.
    assert_bit_identical(final_state(tmp_path / "straight"), final_state(tmp_path / "broken"))
    # The abandoned newer checkpoints did not outlive the new ones.
    assert ckpt.list_checkpoints(root)[0].name == ckpt.step_dir_name(STEPS)
    assert ckpt.verify(ckpt.list_checkpoints(root)[0]) is None


def test_resume_loads_nothing_through_pickle(dataset, tmp_path, monkeypatch):
    config = write_config(tmp_path / "c.yaml", dataset, tmp_path / "run")
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "10")
    first = Trainer(load_config(TrainRunConfig, config)).fit()
    assert first.status == "preempted" and first.step == 10
    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used on a load path")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    resumed = Trainer(load_config(TrainRunConfig, config, ["resume=auto"]))
    resumed.setup()
    assert resumed.counters.step == 10 and resumed.resumed_from.name == ckpt.step_dir_name(10)
    result = resumed.fit()
    assert result.status == "completed" and result.step == STEPS


def test_optimizer_state_round_trips_exactly(tmp_path):
    param = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.Adam([param], lr=1e-3, betas=(0.8, 0.95), eps=1e-9)
    for _ in range(3):
        param.grad = torch.randn(4, 3)
        opt.step()
    tensors, meta = ckpt.optimizer_state_to_files(opt.state_dict())
    ckpt.save_tensors(tmp_path / "opt.safetensors", tensors)
    ckpt.save_json(tmp_path / "opt.json", meta)
    clone = torch.nn.Parameter(param.detach().clone())
    opt2 = torch.optim.Adam([clone], lr=1.0)
    opt2.load_state_dict(ckpt.optimizer_state_from_files(ckpt.load_tensors(tmp_path / "opt.safetensors"),
                                                         ckpt.load_json(tmp_path / "opt.json")))
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 1e-3
    grad = torch.randn(4, 3)
    for p, o in ((param, opt), (clone, opt2)):
        p.grad = grad.clone()
        o.step()
    assert torch.equal(param, clone)


def test_rng_states_round_trip_through_json_and_safetensors(tmp_path):
    import random

    import numpy as np

    tensors, meta = ckpt.capture_rng()
    ckpt.save_tensors(tmp_path / "rng.safetensors", tensors)
    ckpt.save_json(tmp_path / "rng.json", meta)
    expected = (torch.rand(3), np.random.rand(3).tolist(), random.random())
    ckpt.restore_rng(ckpt.load_tensors(tmp_path / "rng.safetensors"), ckpt.load_json(tmp_path / "rng.json"))
    again = (torch.rand(3), np.random.rand(3).tolist(), random.random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_write_checkpoint_is_atomic_and_keeps_last_k(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        ckpt.write_checkpoint(root, step, lambda d: ckpt.save_json(d / "x.json", {"s": 1}), rank=0, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == [ckpt.step_dir_name(4), ckpt.step_dir_name(3)]
    assert not list(root.glob(".tmp-*"))
    assert ckpt.verify(root / ckpt.step_dir_name(4)) is None
    file = root / ckpt.step_dir_name(4) / "x.json"
    file.write_text(file.read_text().replace("1", "2"))  # same size, different bytes
    assert "checksum" in ckpt.verify(root / ckpt.step_dir_name(4))
    assert ckpt.latest_valid(root) == root / ckpt.step_dir_name(3)

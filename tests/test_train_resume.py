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
from pipeline.io.process import EXIT_PREEMPTED
from pipeline.train import checkpoint as ckpt
from pipeline.train.trainer import Trainer

from helpers.stopping import StopAfterStep
from helpers.tiny_training import tiny_dataset, write_tiny_config

HELPERS = Path(__file__).resolve().parent / "helpers"

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
    """`saepipe train CONFIG ARGS`; with signal_at, the same CLI run sends itself SIGTERM right after that step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli.main", "train"] if signal_at is None else \
        [sys.executable, str(HELPERS / "signalled_train.py"), str(signal_at)]
    return subprocess.run([*cmd, str(config), *args], env=env, capture_output=True, text=True, timeout=120)


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
    exported = [load_file(str(tmp_path / run / "final" / "sae_weights.safetensors")) for run in ("straight", "interrupted")]
    assert_bit_identical(*exported)
    # Every logged step once, although the killed runs logged past nothing and the resumes appended.
    assert metric_steps(tmp_path / "interrupted") == metric_steps(tmp_path / "straight") == list(range(5, STEPS + 1, 5))
    if arch == "relu_2023":  # resampling rounds at steps 8, 16, 24 fall in all three runs; some revive latents
        assert re.search(r"resampled [1-9]\d* dead latents \(round", first.stderr + second.stderr + third.stderr)
    if arch == "topk":  # AuxK ran: latents were dead at some point, so restoring firing stats mattered
        records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("aux_loss", 0) > 0 for r in records)


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
    stop = StopAfterStep(10)
    with Trainer(load_config(TrainRunConfig, config), stop=stop, callbacks=[stop]) as trainer:
        first = trainer.fit()
    assert first.status == "preempted" and first.step == 10

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used on a load path")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    with Trainer(load_config(TrainRunConfig, config, ["resume=auto"])) as resumed:
        resumed.setup()
        assert resumed.state.step == 10 and resumed.resumed_from.name == ckpt.step_dir_name(10)
        result = resumed.fit()
    assert result.status == "completed" and result.step == STEPS


def test_optimizer_state_round_trips_exactly(tmp_path):
    param = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.Adam([param], lr=1e-3, betas=(0.8, 0.95), eps=1e-9)
    for _ in range(3):
        param.grad = torch.randn(4, 3)
        opt.step()
    ckpt.save_component(tmp_path, "optimizer", opt.state_dict())
    clone = torch.nn.Parameter(param.detach().clone())
    opt2 = torch.optim.Adam([clone], lr=1.0)
    opt2.load_state_dict(ckpt.load_component(tmp_path, "optimizer"))
    # int-keyed per-parameter state and tuple-valued betas come back as they were, not as JSON's strings and lists
    assert list(opt2.state_dict()["state"]) == [0] and opt2.param_groups[0]["betas"] == (0.8, 0.95)
    assert opt2.param_groups[0]["lr"] == 1e-3
    grad = torch.randn(4, 3)
    for p, o in ((param, opt), (clone, opt2)):
        p.grad = grad.clone()
        o.step()
    assert torch.equal(param, clone)


def test_state_codec_keeps_types_that_json_would_change(tmp_path):
    state = {"a": (1, 2.5), 3: [float("nan"), float("inf")], "t": torch.arange(4), "nested": {"x": torch.ones(2, 2)}}
    ckpt.save_component(tmp_path, "c", state)
    back = ckpt.load_component(tmp_path, "c")
    assert back["a"] == (1, 2.5) and 3 in back and back[3][1] == float("inf") and back[3][0] != back[3][0]
    assert torch.equal(back["t"], state["t"]) and torch.equal(back["nested"]["x"], state["nested"]["x"])
    with pytest.raises(TypeError, match="object"):
        ckpt.save_component(tmp_path, "bad", {"x": object()})


def test_rng_states_round_trip_through_json_and_safetensors(tmp_path):
    import random

    import numpy as np

    ckpt.save_component(tmp_path, "rng", ckpt.RNGState().state_dict())
    expected = (torch.rand(3), np.random.rand(3).tolist(), random.random())
    ckpt.RNGState().load_state_dict(ckpt.load_component(tmp_path, "rng"))
    again = (torch.rand(3), np.random.rand(3).tolist(), random.random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


class _Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value, "w": torch.full((3,), float(self.value))}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_checkpointer_is_atomic_keeps_last_k_and_keeps_an_intact_step(tmp_path):
    root = tmp_path / "checkpoints"
    saver = ckpt.Checkpointer(root, every_steps=1, keep_last=2)
    for step in (1, 2, 3, 4):
        saver.save(step, {"counter": _Counter(step)})
    assert [p.name for p in ckpt.list_checkpoints(root)] == [ckpt.step_dir_name(4), ckpt.step_dir_name(3)]
    assert not list(root.glob(".tmp-*"))
    newest = root / ckpt.step_dir_name(4)
    assert ckpt.verify(newest) is None
    # The same step again (a stop right after the periodic checkpoint): the intact directory is kept, not rewritten.
    before = (newest / "counter.json").stat().st_mtime_ns
    saver.save(4, {"counter": _Counter(99)})
    assert (newest / "counter.json").stat().st_mtime_ns == before
    restored = _Counter()
    ckpt.Checkpointer.load(newest, {"counter": restored})
    assert restored.value == 4
    file = newest / "counter.json"
    file.write_text(file.read_text().replace("4", "5"))  # same size, different bytes
    assert "checksum" in ckpt.verify(newest)
    assert saver.latest_valid() == root / ckpt.step_dir_name(3)
    # A corrupt directory of the same step is replaced whole.
    saver.save(4, {"counter": _Counter(4)})
    assert ckpt.verify(newest) is None and json.loads(file.read_text())["value"] == 4

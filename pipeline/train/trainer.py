"""The SAE training loop on accelerate (DDP): partitioned data, Adam with warmup/decay and clipping, firing statistics,
periodic and signal-triggered checkpoints with exact resume, held-out evaluation and the SAELens export.

Usage:  trainer = Trainer(cfg); trainer.on_metrics.append(hook); result = trainer.fit()
Under `accelerate launch` / torchrun every process runs the same code; rank 0 alone writes the shared files."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import yaml
from accelerate import Accelerator
from tqdm import tqdm

from pipeline.config.train import TrainRunConfig
from pipeline.sae import SAEOutput, SparseAutoencoder, make_sae, resample_dead_latents
from pipeline.store.atomic import TMP_PREFIX, fsync_dir

from . import checkpoint as ckpt
from .collectives import Control
from .cpu_alloc import keep_freed_memory_on_heap
from .data import PartitionedBatches, Split, check_enough_rows, fixed_sample, open_dataset, owned_partitions, split_shards
from .evaluate import EvalResult, evaluate, read_eval_rows, write_eval
from .firing import FiringStats
from .metrics import MetricsHook, MetricsLog, call_hooks
from .schedule import lr_at
from .signals import PreemptionFlag, send_test_signal, signal_at_step_from_env

log = logging.getLogger(__name__)

# Config keys that must not change between a checkpoint and its resumption: they define the state being restored.
# (A moved dataset root is fine: the reader's own state check still catches different shards.)
CALIBRATION_BATCHES = 4  # whole training batches of rows that set BatchTopK's inference threshold at the end
FROZEN_ON_RESUME = ("sae", "data.partitions", "data.eval_shards", "train.batch_size", "train.seed")


@dataclass
class TrainResult:
    status: Literal["completed", "preempted"]
    step: int
    tokens: int
    run_dir: Path
    eval: dict | None = None
    signal: int | None = None
    checkpoint: Path | None = None


@dataclass
class _Counters:
    step: int = 0
    tokens: int = 0
    # Interval sums of the SAE's logged terms, kept on the device so logging costs no per-step host sync.
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps_in_interval: int = 0


def _dotted(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


class Trainer:
    def __init__(self, cfg: TrainRunConfig, accelerator: Accelerator | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.on_metrics: list[MetricsHook] = []
        self.accelerator = accelerator
        self._ready = False

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything before the first step, including every input check and the resume. Idempotent."""
        if self._ready:
            return
        cfg = self.cfg
        tc = cfg.train
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        use_cpu = tc.device == "cpu" or (tc.device == "auto" and not torch.cuda.is_available())
        if tc.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("train.device is cuda but no GPU is visible")
        precision = {"auto": "no" if use_cpu else "bf16", "bf16": "bf16", "fp32": "no"}[tc.precision]
        acc = self.accelerator or Accelerator(cpu=use_cpu, mixed_precision=precision)
        self.accelerator = acc
        if tc.threads is not None:
            torch.set_num_threads(tc.threads)
        if acc.device.type == "cpu":
            keep_freed_memory_on_heap()
        self.rank, self.world = acc.process_index, acc.num_processes
        self.control = Control()
        self.device = acc.device
        self.total_steps = tc.total_steps

        # Inputs first: every bad-input error comes before any weights exist.
        owned_partitions(cfg.data.partitions, self.rank, self.world)
        self.dataset = open_dataset(cfg.data, cfg.sae.d_in)
        self.split: Split = split_shards(self.dataset, cfg.data)
        check_enough_rows(self.dataset, self.split, tc.batch_size, cfg.data.root)

        sae = make_sae(cfg.sae).to(self.device)
        # The fused kernel (CPU and CUDA) is one pass over each parameter instead of a dozen: 4x faster here.
        fused = self.device.type in ("cpu", "cuda")
        optimizer = torch.optim.Adam(sae.parameters(), lr=lr_at(0, tc), betas=tc.betas, eps=tc.eps, fused=fused)
        self.firing = FiringStats(cfg.sae.d_sae, self.device)
        self.batches = PartitionedBatches(
            self.dataset, self.split.train, global_batch=tc.batch_size, partitions=cfg.data.partitions,
            rank=self.rank, world_size=self.world, seed=tc.seed,
            # To a GPU: ship the stored bf16 (half the bytes) from pinned memory and widen there. On CPU the
            # reader's thread widens, off the training thread.
            dtype=torch.bfloat16 if self.device.type == "cuda" else torch.float32,
            pin_memory=self.device.type == "cuda",
        )
        self.counters = _Counters()
        self._saved_step: int | None = None  # step of the newest checkpoint on disk from this run
        self._eval_rows: torch.Tensor | None = None  # held-out window, read once
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.ckpt_root = self.run_dir / "checkpoints"

        if cfg.resume == "never" and ckpt.list_checkpoints(self.ckpt_root):
            raise ValueError(
                f"run_dir {self.run_dir} already has checkpoints: pass --resume (resume=auto) to continue it, or use a new run_dir"
            )
        resumed = self._find_resume_checkpoint() if cfg.resume == "auto" else None
        if resumed is None:
            sample = fixed_sample(self.dataset, self.split.train, cfg.data.init_rows, seed=tc.seed)
            sae.init_from_sample(sample.to(self.device))
        else:
            rng = self._load_checkpoint(resumed, sae, optimizer)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            self.metrics_log.truncate_after(self.counters.step)

        self.model, self.optimizer = acc.prepare(sae, optimizer)
        self.sae: SparseAutoencoder = acc.unwrap_model(self.model)
        # The raw optimiser: its state_dict is what the checkpoint stores, and the resampler edits its moments.
        self.raw_optimizer: torch.optim.Optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if resumed is not None:
            ckpt.restore_rng(*rng)  # last, so nothing in setup consumes the restored streams
        self.resumed_from = resumed
        if self.rank == 0:
            log.info("training %s (%d latents) on %d process(es), device %s, %s; %d steps of %d rows; partitions %s on rank 0",
                     cfg.sae.arch, cfg.sae.d_sae, self.world, self.device, precision, self.total_steps, tc.batch_size,
                     self.batches.owned)
        self._ready = True

    def _find_resume_checkpoint(self) -> Path | None:
        # Rank 0 verifies (checksums are not free) and tells the others which step to load.
        path = ckpt.latest_valid(self.ckpt_root) if self.rank == 0 else None
        step = self.control.broadcast_int(-1 if path is None else ckpt.checkpoint_step(path))
        if step < 0:
            if self.rank == 0:
                log.info("resume: no valid checkpoint in %s, starting fresh", self.ckpt_root)
            return None
        return self.ckpt_root / ckpt.step_dir_name(step)

    def _load_checkpoint(self, path: Path, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer):
        meta = ckpt.load_checked(path / "trainer.json", ckpt.load_json)
        saved_cfg, now_cfg = meta["config"], self.cfg.model_dump(mode="json")
        changed = [k for k in FROZEN_ON_RESUME if _dotted(saved_cfg, k) != _dotted(now_cfg, k)]
        if changed:
            raise ValueError(f"resume from {path}: config keys changed since the checkpoint: {', '.join(changed)}")
        sae.load_tensors(ckpt.load_checked(path / "sae.safetensors", ckpt.load_tensors), str(path / "sae.safetensors"))
        opt_tensors = ckpt.load_checked(path / "optimizer.safetensors", ckpt.load_tensors)
        optimizer.load_state_dict(ckpt.optimizer_state_from_files(opt_tensors, meta["optimizer"]))
        self.firing.load_state_dict(ckpt.load_checked(path / "firing.safetensors", ckpt.load_tensors))
        self.batches.load_state_dict(
            {p: ckpt.load_checked(path / "reader" / f"partition_{p}.json", ckpt.load_json) for p in self.batches.owned}
        )
        self.counters.step, self.counters.tokens = meta["step"], meta["tokens"]
        self._saved_step = meta["step"]
        rng_rank = self.rank if (path / "rng" / f"rank_{self.rank}.json").exists() else 0
        if rng_rank != self.rank or meta["world_size"] != self.world:
            log.warning("resume: checkpoint was written by %d processes, now %d; RNG streams are not exact",
                        meta["world_size"], self.world)
        rng = (
            ckpt.load_checked(path / "rng" / f"rank_{rng_rank}.safetensors", ckpt.load_tensors),
            ckpt.load_checked(path / "rng" / f"rank_{rng_rank}.json", ckpt.load_json),
        )
        log.info("resumed from %s (step %d, %d tokens)", path, self.counters.step, self.counters.tokens)
        return rng

    # ------------------------------------------------------------------ one step

    def train_step(self, x: torch.Tensor) -> SAEOutput:
        """One optimiser step on this rank's slice `x` of the global batch."""
        cfg, c = self.cfg, self.counters
        lr = lr_at(c.step, cfg.train)
        for group in self.raw_optimizer.param_groups:
            group["lr"] = lr
        x = x.to(self.device, non_blocking=True).float()
        dead = self.firing.dead_mask(cfg.sae.dead_tokens)
        out = self.model(x, progress=c.step / self.total_steps, dead_mask=dead)
        self.accelerator.backward(out.loss)
        self.sae.before_optimizer_step()
        if cfg.train.grad_clip is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sae.after_optimizer_step()
        self.firing.update(out.fired, cfg.train.batch_size)
        c.step += 1
        c.tokens += cfg.train.batch_size
        for name, value in {"loss": out.loss.detach(), **out.terms}.items():
            v = value.detach().float().to(self.device)
            c.sums[name] = c.sums[name] + v if name in c.sums else v.clone()
        c.steps_in_interval += 1
        self._maybe_resample()
        return out

    def _calibrate_threshold(self) -> None:
        """BatchTopK: replace the training EMA of the batch cut by the cut the final weights give (see
        BatchTopKSAE.calibrate_threshold), on a fixed sample of training rows, so that inference L0 is k on average."""
        calibrate = getattr(self.sae, "calibrate_threshold", None)
        if calibrate is None:
            return
        tc = self.cfg.train
        sample = fixed_sample(self.dataset, self.split.train, CALIBRATION_BATCHES * tc.batch_size, seed=tc.seed + 1)
        ema = float(self.sae.threshold)
        theta = calibrate(sample, min(tc.batch_size, sample.shape[0]))
        if self.rank == 0:
            log.info("batchtopk: inference threshold %.4g from %d training rows (training EMA was %.4g)", theta, sample.shape[0], ema)

    def _maybe_resample(self) -> None:
        rc = self.cfg.sae.resample
        step = self.counters.step
        if rc is None or step % rc.every_steps or step == self.total_steps:
            return
        round_ = step // rc.every_steps
        if rc.max_rounds is not None and round_ > rc.max_rounds:
            return
        dead = self.firing.dead_mask(rc.window_steps * self.cfg.train.batch_size)
        # Identical inputs and seed on every rank, so every replica makes the same edit; the broadcast below
        # guards against last-bit differences between devices.
        seed = self.cfg.train.seed * 1_000_003 + step
        inputs = fixed_sample(self.dataset, self.split.train, rc.sample_inputs, seed=seed)
        count = resample_dead_latents(
            self.sae, self.raw_optimizer, dead, inputs, encoder_scale=rc.encoder_scale, bias_value=rc.bias_value, seed=seed
        )
        if self.world > 1:
            for tensor in [*self.sae.parameters(), *self.sae.buffers()]:
                dist.broadcast(tensor.data, src=0)
        if self.rank == 0:
            log.info("step %d: resampled %d dead latents (round %d)", step, count, round_)

    # ------------------------------------------------------------------ logging, eval, checkpoint, export

    def _log_metrics(self, started: float, bar: tqdm | None) -> dict:
        c = self.counters
        names = sorted(c.sums)
        values = torch.stack([c.sums[n] for n in names]) / max(c.steps_in_interval, 1)
        if self.world > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.world
        metrics = {
            "step": c.step,
            "tokens": c.tokens,
            "lr": lr_at(c.step - 1, self.cfg.train),
            **{n: float(v) for n, v in zip(names, values.tolist())},
            "dead_pct": 100.0 * self.firing.dead_fraction(self.cfg.sae.dead_tokens),
            "tokens_per_s": c.steps_in_interval * self.cfg.train.batch_size / max(time.perf_counter() - started, 1e-9),
        }
        c.sums, c.steps_in_interval = {}, 0
        if self.rank == 0:
            self.metrics_log.write({"time": time.time(), **metrics})
            call_hooks(self.on_metrics, c.step, metrics)
            if bar is not None:
                bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "mse", "l0", "dead_pct") if k in metrics})
        return metrics

    def run_eval(self, tag: str) -> dict | None:
        """Held-out evaluation on rank 0 (the others wait); metrics go to eval/<tag>/ , the JSONL and the hooks."""
        metrics = None
        if self.rank == 0:
            ec = self.cfg.eval
            if self._eval_rows is None:
                self._eval_rows = read_eval_rows(self.dataset, self.split.eval, ec.max_rows)
            result: EvalResult = evaluate(
                self.sae, self._eval_rows, batch_size=ec.batch_size, dense_threshold=ec.dense_threshold, device=self.device
            )
            metrics = write_eval(result, self.run_dir / "eval" / tag, step=self.counters.step, histogram=ec.histogram)
            prefixed = {"step": self.counters.step, **{f"eval/{k}": v for k, v in metrics.items() if k != "step"}}
            self.metrics_log.write({"time": time.time(), **prefixed})
            call_hooks(self.on_metrics, self.counters.step, prefixed)
            log.info("eval %s: fvu %.4f, mse %.4g, l0 %.1f, dead %.1f%%, dense %.1f%%", tag,
                     metrics["fvu"], metrics["mse"], metrics["l0"], metrics["dead_pct"], metrics["dense_pct"])
        self.control.barrier()
        return metrics

    def save_checkpoint(self) -> Path:
        c = self.counters

        def write_files(tmp: Path) -> None:
            if self.rank == 0:
                ckpt.save_tensors(tmp / "sae.safetensors", self.sae.state_dict())
                opt_tensors, opt_meta = ckpt.optimizer_state_to_files(self.raw_optimizer.state_dict())
                ckpt.save_tensors(tmp / "optimizer.safetensors", opt_tensors)
                ckpt.save_tensors(tmp / "firing.safetensors", self.firing.state_dict())
                ckpt.save_json(tmp / "trainer.json", {
                    "step": c.step,
                    "tokens": c.tokens,
                    "world_size": self.world,
                    "scheduler": {"step": c.step, "lr": lr_at(c.step, self.cfg.train)},
                    "optimizer": opt_meta,
                    "config": self.cfg.model_dump(mode="json"),
                })
            for p, state in self.batches.state_dict().items():
                ckpt.save_json(tmp / "reader" / f"partition_{p}.json", state)
            rng_tensors, rng_meta = ckpt.capture_rng()
            ckpt.save_tensors(tmp / "rng" / f"rank_{self.rank}.safetensors", rng_tensors)
            ckpt.save_json(tmp / "rng" / f"rank_{self.rank}.json", rng_meta)

        path = ckpt.write_checkpoint(self.ckpt_root, c.step, write_files, rank=self.rank,
                                     keep_last=self.cfg.checkpoint.keep_last, barrier=self.control.barrier)
        self._saved_step = c.step
        return path

    def export_final(self) -> Path:
        final = self.run_dir / "final"
        if self.rank == 0:
            tmp = self.run_dir / f"{TMP_PREFIX}final"
            shutil.rmtree(tmp, ignore_errors=True)
            self.sae.export_saelens(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            fsync_dir(self.run_dir)
            log.info("exported SAELens weights to %s", final)
        self.control.barrier()
        return final

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        with PreemptionFlag() as flag:
            self.setup()
            return self._loop(flag)

    def _loop(self, flag: PreemptionFlag) -> TrainResult:
        cfg, c = self.cfg, self.counters
        signal_at = signal_at_step_from_env()
        last_ckpt: Path | None = None
        # In a batch job's log file every refresh is a line: refresh rarely there.
        interactive = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=c.step, unit="step", dynamic_ncols=True, disable=self.rank != 0,
                   mininterval=0.5 if interactive else 30.0)
        interval_start = time.perf_counter()
        try:
            while c.step < self.total_steps:
                self.train_step(next(self.batches))
                bar.update(1)
                if c.step % cfg.train.log_every == 0 or c.step == self.total_steps:
                    self._log_metrics(interval_start, bar)
                    interval_start = time.perf_counter()
                send_test_signal(c.step, self.rank, signal_at)
                # All ranks must agree, or one would wait forever in the checkpoint's collectives.
                if self.control.any(flag.raised):
                    path = self.save_checkpoint()
                    log.warning("signal %s: checkpointed step %d to %s; exiting for requeue", flag.signum, c.step, path)
                    return TrainResult("preempted", c.step, c.tokens, self.run_dir, signal=flag.signum, checkpoint=path)
                if c.step % cfg.checkpoint.every_steps == 0 and c.step < self.total_steps:
                    last_ckpt = self.save_checkpoint()
                if cfg.eval.every_steps and c.step % cfg.eval.every_steps == 0 and c.step < self.total_steps:
                    self.run_eval(f"step_{c.step:09d}")
        finally:
            bar.close()
            self.batches.close()
        self._calibrate_threshold()
        # A resumed, already finished run has its final checkpoint: do not rewrite it.
        last_ckpt = self.save_checkpoint() if self._saved_step != c.step else self.ckpt_root / ckpt.step_dir_name(c.step)
        metrics = self.run_eval("final")
        self.export_final()
        return TrainResult("completed", c.step, c.tokens, self.run_dir, eval=metrics, checkpoint=last_ckpt)


def train(cfg: TrainRunConfig, hooks: list[MetricsHook] = ()) -> TrainResult:
    trainer = Trainer(cfg)
    trainer.on_metrics.extend(hooks)
    return trainer.fit()

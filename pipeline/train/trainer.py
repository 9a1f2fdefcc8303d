"""The SAE trainer, assembled from components that each decide their own cadence: the partitioned data provider
(pipeline.train.data), the held-out evaluator (heldout), the checkpointer over stateful components (checkpoint), the
interval metrics (metrics), the firing statistics (firing), and whatever the caller passes in: a stop condition it
polls after every step and callbacks it fires with its metrics and events (pipeline.train.callbacks).

    with Trainer(cfg, stop=flag, callbacks=[exporter]) as trainer:
        result = trainer.fit()

The trainer installs no signal handlers and makes no process-wide allocator settings: its caller does (the CLI,
a submitit job) and hands over the stop condition. Under `accelerate launch` / torchrun every process runs the same
code; rank 0 alone writes the shared files.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.distributed as dist
import yaml
from accelerate import Accelerator
from tqdm import tqdm

from pipeline.config.train import TrainRunConfig
from pipeline.errors import CheckpointError, ConfigError, LeaseHeldError
from pipeline.eval import split_shards
from pipeline.hooks import Callbacks, NeverStop, StopCondition
from pipeline.io import Lease, atomic_write_json, atomic_write_text
from pipeline.sae import SAEOutput, SparseAutoencoder, export_saelens, make_sae, resample_dead_latents, saelens_metadata

from .checkpoint import Checkpointer, RNGState, has_component, list_checkpoints, load_component
from .collectives import Control
from .data import PartitionedBatches, check_enough_rows, fixed_sample, open_dataset, owned_partitions
from .firing import FiringStats
from .heldout import HeldOutEval
from .metrics import IntervalMeans, MetricsLog
from .schedule import lr_at
from .verify import verify_store

log = logging.getLogger(__name__)

CALIBRATION_BATCHES = 4  # whole training batches of rows that set BatchTopK's inference threshold at the end
# Config keys that must not change between a checkpoint and its resumption: they define the state being restored.
# (A moved dataset root is fine: the reader's own state check still catches different shards.)
FROZEN_ON_RESUME = ("sae", "data.partitions", "data.eval_shards", "train.batch_size", "train.seed")
STATUS_FILE = "status.json"  # written when a run has finished: what a rerun reads to say so and exit
LEASE_FILE = "lease.json"


@dataclass
class TrainResult:
    status: Literal["completed", "preempted"]
    step: int
    tokens: int
    run_dir: Path
    eval: dict | None = None
    stop_reason: str | None = None
    checkpoint: Path | None = None
    already_finished: bool = False  # a rerun of a finished run: nothing was trained


class TrainerState:
    """The counters and the run's identity, as a checkpoint component."""

    def __init__(self, cfg: TrainRunConfig, world_size: int) -> None:
        self.cfg, self.world_size = cfg, world_size
        self.step = self.tokens = 0
        self.resumes = 0  # how often this run was resumed from a checkpoint (requeues, restarts)
        self.saved_world_size = world_size

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "resumes": self.resumes, "world_size": self.world_size,
                "config": self.cfg.model_dump(mode="json")}

    def load_state_dict(self, state: dict) -> None:
        now = self.cfg.model_dump(mode="json")
        changed = [k for k in FROZEN_ON_RESUME if _dotted(state["config"], k) != _dotted(now, k)]
        if changed:
            raise CheckpointError(f"config keys changed since the checkpoint: {', '.join(changed)} "
                                  "(they define the state being restored; use a new run_dir to change them)")
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.resumes = int(state.get("resumes", 0)) + 1
        self.saved_world_size = int(state["world_size"])


def _dotted(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


class Trainer:
    def __init__(self, cfg: TrainRunConfig, *, stop: StopCondition | None = None, callbacks: Sequence[object] = (),
                 accelerator: Accelerator | None = None, show_progress: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.stop = stop or NeverStop()
        self.callbacks = Callbacks(callbacks)
        self.accelerator = accelerator
        self.show_progress = show_progress
        self.finished: dict | None = None  # status.json of a run that had already finished
        self._ready = False
        self._lease: Lease | None = None
        self._threads_before: int | None = None
        self.batches: PartitionedBatches | None = None
        self.dataset = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything before the first step: every input check, the lease, the store's checksums, the resume.
        Idempotent."""
        if self._ready:
            return
        cfg, tc = self.cfg, self.cfg.train
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        use_cpu = tc.device == "cpu" or (tc.device == "auto" and not torch.cuda.is_available())
        if tc.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no GPU is visible")
        self.precision = {"auto": "no" if use_cpu else "bf16", "bf16": "bf16", "fp32": "no"}[tc.precision]
        # Autocast is the trainer's own (train_step), not accelerate's mixed_precision: accelerate keeps that in a
        # process-wide singleton that refuses a second trainer of another precision in the same process.
        acc = self.accelerator or Accelerator(cpu=use_cpu)
        self.accelerator = acc
        if tc.threads is not None:  # given back by close(): a process may hold other work than this run
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(tc.threads)
        self.rank, self.world = acc.process_index, acc.num_processes
        self.control = Control()
        self.device = acc.device
        self.total_steps = tc.total_steps

        # Inputs first: every bad-input error comes before anything is written or any weights exist.
        owned_partitions(cfg.data.partitions, self.rank, self.world)
        self.dataset = open_dataset(cfg.data, cfg.sae.d_in)
        self.split = split_shards(self.dataset, cfg.data.eval_shards)
        check_enough_rows(self.dataset, self.split, tc.batch_size, cfg.data.root)
        self.finished = self._finished_status()
        if self.finished is not None:
            self._ready = True
            return
        self.batches = PartitionedBatches(
            self.dataset, self.split.train, global_batch=tc.batch_size, partitions=cfg.data.partitions,
            rank=self.rank, world_size=self.world, seed=tc.seed,
            # To a GPU: ship the stored bf16 (half the bytes) from pinned memory and widen there. On CPU the
            # reader's thread widens, off the training thread.
            dtype=torch.bfloat16 if self.device.type == "cuda" else torch.float32,
            pin_memory=self.device.type == "cuda",
        )
        self._take_lease()
        if cfg.data.verify_checksums:
            verify_store(self.dataset, self.run_dir, self.control, self.rank, self.world, self.show_progress)

        self.state = TrainerState(cfg, self.world)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", every_steps=cfg.checkpoint.every_steps,
                                         keep_last=cfg.checkpoint.keep_last, rank=self.rank,
                                         barrier=self.control.barrier, broadcast_str=self.control.broadcast_str)
        if cfg.resume == "never" and list_checkpoints(self.checkpointer.root):
            raise ConfigError(f"run_dir {self.run_dir} already has checkpoints: pass --resume (resume=auto) to "
                              "continue it, or use a new run_dir")
        resume_from = self._find_resume_checkpoint() if cfg.resume == "auto" else None

        sae = make_sae(cfg.sae).to(self.device)
        # The fused kernel (CPU and CUDA) is one pass over each parameter instead of a dozen: 4x faster here.
        fused = self.device.type in ("cpu", "cuda")
        optimizer = torch.optim.Adam(sae.parameters(), lr=lr_at(0, tc), betas=tc.betas, eps=tc.eps, fused=fused)
        self.firing = FiringStats(cfg.sae.d_sae, self.device)
        self.evaluator = HeldOutEval(cfg.eval, self.dataset, self.split.eval, self.run_dir, self.device)
        self.interval = IntervalMeans(tc.log_every)
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.rng = RNGState()
        self._components = {"trainer": self.state, "sae": sae, "optimizer": optimizer, "firing": self.firing}
        if resume_from is None:
            sample = fixed_sample(self.dataset, self.split.train, cfg.data.init_rows, seed=tc.seed)
            sae.init_from_sample(sample.to(self.device))
        else:
            self._load_checkpoint(resume_from)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            self.metrics_log.truncate_after(self.state.step)

        self.model, self.optimizer = acc.prepare(sae, optimizer)
        self.sae: SparseAutoencoder = acc.unwrap_model(self.model)
        # The raw optimiser: the resampler edits its moments.
        self.raw_optimizer: torch.optim.Optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if resume_from is not None:
            self._restore_rng(resume_from)  # last, so nothing in setup consumes the restored streams
        self.resumed_from = resume_from
        precision = "bf16 autocast" if self.precision == "bf16" else "fp32"
        if self.rank == 0:
            log.info("training %s (%d latents) on %d process(es), %s, %s; %d steps of %d rows; partitions %s on rank 0",
                     cfg.sae.arch, cfg.sae.d_sae, self.world, self.device, precision, self.total_steps, tc.batch_size,
                     self.batches.owned)
        self.callbacks.fire("on_setup", {
            "run_dir": str(self.run_dir), "arch": cfg.sae.arch, "d_sae": cfg.sae.d_sae, "total_steps": self.total_steps,
            "batch_size": tc.batch_size, "world_size": self.world, "rank": self.rank, "device": str(self.device),
            "precision": precision, "start_step": self.state.step, "requeues": self.state.resumes,
            "checkpoint_every_steps": cfg.checkpoint.every_steps,
        })
        self._ready = True

    def _local_components(self) -> dict[str, object]:
        """What this rank writes into a checkpoint: rank 0 the shared state, every rank its data partitions' positions
        and its RNG streams."""
        parts: dict[str, object] = dict(self._components) if self.rank == 0 else {}
        parts.update({f"reader/partition_{p}": reader for p, reader in self.batches.readers.items()})
        parts[f"rng/rank_{self.rank}"] = self.rng
        return parts

    def _finished_status(self) -> dict | None:
        """status.json of a finished run of this very config, or None."""
        path = self.run_dir / STATUS_FILE
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        # how the run is launched (resume mode, Slurm resources, telemetry) is not what it trains
        launch = {"resume": None, "slurm": None, "telemetry": None}
        same = {**status.get("config", {}), **launch} == {**self.cfg.model_dump(mode="json"), **launch}
        if status.get("status") == "completed" and status.get("step") == self.total_steps and same:
            return status
        return None

    def _take_lease(self) -> None:
        """Rank 0 holds the run directory's lease; every rank learns whether it got it, so that all stop together."""
        error: LeaseHeldError | None = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lease = Lease(self.run_dir / LEASE_FILE, what=f"training run {self.run_dir}",
                                timeout_s=self.cfg.lease_timeout_s)
            try:
                self._lease.acquire()
            except LeaseHeldError as err:
                error, self._lease = err, None
        if self.control.broadcast_int(0 if error else 1) == 0:
            raise error or LeaseHeldError(f"training run {self.run_dir} is held by another process (see rank 0)")

    def _find_resume_checkpoint(self) -> Path | None:
        # Rank 0 verifies (checksums are not free) and tells the others which one to load.
        path = self.checkpointer.latest_valid() if self.rank == 0 else None
        name = self.control.broadcast_str("" if path is None else path.name)
        if not name:
            if self.rank == 0:
                log.info("resume: no valid checkpoint in %s, starting fresh", self.checkpointer.root)
            return None
        return self.checkpointer.root / name

    def _load_checkpoint(self, path: Path) -> None:
        Checkpointer.load(path, self._components)  # "trainer" first: it checks the frozen config keys
        Checkpointer.load(path, {f"reader/partition_{p}": r for p, r in self.batches.readers.items()})
        self.checkpointer.last_saved_step = self.state.step
        log.info("resumed from %s (step %d, %d tokens, resume #%d)", path, self.state.step, self.state.tokens,
                 self.state.resumes)

    def _restore_rng(self, path: Path) -> None:
        name = f"rng/rank_{self.rank}"
        if not has_component(path, name) or self.state.saved_world_size != self.world:
            log.warning("resume: checkpoint was written by %d processes, now %d; RNG streams are not exact",
                        self.state.saved_world_size, self.world)
            name = "rng/rank_0"
        self.rng.load_state_dict(load_component(path, name))

    # ------------------------------------------------------------------ one step

    def train_step(self, x: torch.Tensor) -> SAEOutput:
        """One optimiser step on this rank's slice `x` of the global batch."""
        cfg, st = self.cfg, self.state
        lr = lr_at(st.step, cfg.train)
        for group in self.raw_optimizer.param_groups:
            group["lr"] = lr
        x = x.to(self.device, non_blocking=True).float()
        dead = self.firing.dead_mask(cfg.sae.dead_tokens)
        # Parameters and Adam state stay fp32; under bf16 the SAE's dense GEMMs run in bf16 (pipeline.sae.autograd).
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.model(x, progress=st.step / self.total_steps, dead_mask=dead)
        self.accelerator.backward(out.loss)
        self.sae.before_optimizer_step()
        if cfg.train.grad_clip is not None:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        else:  # the norm alone: clip_grad_norm_ with an infinite bound would still rescale every gradient by 1
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sae.after_optimizer_step()
        self.firing.update(out.fired, cfg.train.batch_size)
        st.step += 1
        st.tokens += cfg.train.batch_size
        self.interval.add({"loss": out.loss, "grad_norm": grad_norm, **out.terms})
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
            log.info("batchtopk: inference threshold %.4g from %d training rows (training EMA was %.4g)", theta,
                     sample.shape[0], ema)

    def _maybe_resample(self) -> None:
        rc = self.cfg.sae.resample
        step = self.state.step
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
        before = self._sample_loss(inputs) if self.rank == 0 else None
        count = resample_dead_latents(
            self.sae, self.raw_optimizer, dead, inputs, encoder_scale=rc.encoder_scale, bias_value=rc.bias_value, seed=seed
        )
        if self.world > 1:
            for tensor in [*self.sae.parameters(), *self.sae.buffers()]:
                dist.broadcast(tensor.data, src=0)
        if self.rank == 0:
            log.info("step %d: resampled %d dead latents (round %d)", step, count, round_)
            # What seed 000 compares (`saepipe report`): the loss on the round's own sample just before and just
            # after the edit. Not a training record (no "loss" key), so readers of the training curve skip it.
            after = self._sample_loss(inputs)
            self.metrics_log.write({"time": time.time(), "step": step, "event": "resample", "round": round_,
                                    "resampled": count, "sample_rows": int(inputs.shape[0]),
                                    **{f"{k}_before": v for k, v in before.items()},
                                    **{f"{k}_after": v for k, v in after.items()}})

    @torch.no_grad()
    def _sample_loss(self, inputs: torch.Tensor, chunk_rows: int = 8192) -> dict[str, float]:
        """Training loss, its reconstruction term and FVU of the current weights on `inputs`, in fp32 whatever the
        training precision (a before/after comparison must not see autocast noise). Reads no RNG and changes no
        state, so that a run with these records trains bit for bit as one without."""
        progress = self.state.step / self.total_steps
        loss = recon = sq_err = 0.0
        rows = inputs.shape[0]
        mean = inputs.double().mean(0).to(self.device)
        total_var = 0.0
        for chunk in inputs.split(chunk_rows):
            x = chunk.to(self.device, torch.float32)
            out = self.sae(x, progress=progress)
            n = x.shape[0]
            loss += float(out.loss) * n
            recon += float(out.terms["recon_loss"]) * n
            sq_err += (x - out.x_hat).double().pow(2).sum().item()
            total_var += (x.double() - mean).pow(2).sum().item()
        return {"loss": loss / rows, "recon_loss": recon / rows, "fvu": sq_err / total_var if total_var > 0 else float("nan")}

    # ------------------------------------------------------------------ logging, eval, checkpoint, export

    def _log_metrics(self, interval_seconds: float, data_wait: float, steps: int, bar: tqdm) -> dict:
        names, values = self.interval.take()
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.world
        st = self.state
        metrics = {
            "step": st.step,
            "tokens": st.tokens,
            "lr": lr_at(st.step - 1, self.cfg.train),
            **{n: float(v) for n, v in zip(names, values.tolist())},
            "dead_pct": 100.0 * self.firing.dead_fraction(self.cfg.sae.dead_tokens),
            "tokens_per_s": steps * self.cfg.train.batch_size / max(interval_seconds, 1e-9),
            "step_seconds": interval_seconds / max(steps, 1),
            "data_wait_seconds": data_wait / max(steps, 1),
        }
        if self.rank == 0:
            self.metrics_log.write({"time": time.time(), **metrics})
            bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "fvu", "l0", "dead_pct") if k in metrics})
        self.callbacks.fire("on_metrics", st.step, dict(metrics))
        return metrics

    def run_eval(self, tag: str) -> dict | None:
        """Held-out evaluation on rank 0 (the others wait); metrics go to eval/<tag>/, the JSONL and the callbacks."""
        metrics = None
        if self.rank == 0:
            metrics = self.evaluator.run(self.sae, self.state.step, tag)
            self.metrics_log.write({"time": time.time(), "step": self.state.step,
                                    **{f"eval/{k}": v for k, v in metrics.items() if k != "step"}})
        self.control.barrier()
        self.callbacks.fire("on_eval", self.state.step, dict(metrics) if metrics else None)
        return metrics

    def save_checkpoint(self) -> Path:
        self._check_lease()
        path = self.checkpointer.save(self.state.step, self._local_components())
        self.callbacks.fire("on_checkpoint", self.state.step, path, self.checkpointer.last_save_seconds or 0.0)
        return path

    def export_final(self) -> Path:
        final = self.run_dir / "final"
        if self.rank == 0:
            metadata = saelens_metadata(self.dataset.meta.to_json_dict(), str(self.dataset.root))
            export_saelens(self.sae, final, metadata=metadata)  # atomic: an earlier export stays whole until replaced
            log.info("exported the SAE in SAELens format to %s", final)
        self.control.barrier()
        return final

    def _check_lease(self) -> None:
        if self._lease is not None:
            self._lease.check()

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        self.setup()
        if self.finished is not None:
            st = self.finished
            log.info("run %s already finished at step %d (%d tokens); nothing to do (export in %s)", self.run_dir,
                     st["step"], st["tokens"], self.run_dir / "final")
            result = TrainResult("completed", st["step"], st["tokens"], self.run_dir, eval=st.get("eval"),
                                 already_finished=True)
            self.callbacks.fire("on_finish", result)
            return result
        result = self._loop()
        self.callbacks.fire("on_finish", result)
        return result

    def _loop(self) -> TrainResult:
        cfg, st = self.cfg, self.state
        # In a batch job's log file every refresh is a line: refresh rarely there.
        interactive = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=st.step, unit="step", dynamic_ncols=True,
                   disable=self.rank != 0 or not self.show_progress, mininterval=0.5 if interactive else 30.0)
        interval_start, data_wait, steps = time.perf_counter(), 0.0, 0
        try:
            while st.step < self.total_steps:
                t0 = time.perf_counter()
                x = next(self.batches)
                data_wait += time.perf_counter() - t0
                self.train_step(x)
                steps += 1
                bar.update(1)
                self.callbacks.fire("on_step_end", st.step)
                if self.interval.due(st.step, self.total_steps):
                    self._log_metrics(time.perf_counter() - interval_start, data_wait, steps, bar)
                    interval_start, data_wait, steps = time.perf_counter(), 0.0, 0
                # All ranks must agree, or one would wait forever in the checkpoint's collectives.
                if self.control.any(self.stop.should_stop()):
                    path = self.save_checkpoint()
                    reason = getattr(self.stop, "reason", None) or "stop requested"
                    log.warning("%s: checkpointed step %d to %s; exiting for requeue", reason, st.step, path)
                    return TrainResult("preempted", st.step, st.tokens, self.run_dir, stop_reason=reason,
                                       checkpoint=path)
                if self.checkpointer.due(st.step) and st.step < self.total_steps:
                    self.save_checkpoint()
                if self.evaluator.due(st.step, self.total_steps):
                    self.run_eval(f"step_{st.step:09d}")
        finally:
            bar.close()
            self.batches.close()
        self._calibrate_threshold()
        last_ckpt = self.save_checkpoint()  # kept as it is when a resumed, already finished run wrote it
        metrics = self.run_eval("final")
        self.export_final()
        if self.rank == 0:
            atomic_write_json(self.run_dir / STATUS_FILE, {
                "status": "completed", "step": st.step, "tokens": st.tokens, "finished_at": time.time(),
                "eval": metrics, "export": str(self.run_dir / "final"), "config": cfg.model_dump(mode="json"),
            })
        self.control.barrier()
        return TrainResult("completed", st.step, st.tokens, self.run_dir, eval=metrics, checkpoint=last_ckpt)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop the reader threads, close the store, release the run's lease, give back the thread count. Idempotent."""
        if self.batches is not None:
            self.batches.close()
        if self.dataset is not None:
            self.dataset.close()
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train(cfg: TrainRunConfig, *, stop: StopCondition | None = None, callbacks: Sequence[object] = (),
          show_progress: bool = True) -> TrainResult:
    with Trainer(cfg, stop=stop, callbacks=callbacks, show_progress=show_progress) as trainer:
        return trainer.fit()

"""A small TopK SAE trained on real SmolLM2-135M activations of the bundled sample, for the tests of what comes after
training (analysis, the browser, spliced evaluation, steering). Built once per session by the `smollm2_sae` fixture:
about 16k tokens of layer 15's residual stream and 150 steps of a 4x SAE, a minute or two on two cores."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ExtractRunConfig, validate
from pipeline.config.train import TrainRunConfig

LAYER = 15
CTX_LEN = 128


@dataclass(frozen=True)
class SmolLM2SAE:
    store_root: Path   # the activation store (eval shards: the train config's data.eval_shards)
    run_dir: Path      # the training run (config.yaml, metrics.jsonl, eval/, checkpoints/)
    sae_dir: Path      # run_dir/final: the SAELens-format export
    extract: ExtractRunConfig
    train: TrainRunConfig


def build(root: Path, loaded, sample: str, *, tokens: int = 16_000, d_sae: int = 2304, steps: int = 150) -> SmolLM2SAE:
    from pipeline.extract.runner import ExtractionRunner
    from pipeline.train.trainer import Trainer

    ecfg = validate(ExtractRunConfig, {
        "corpus": {"paths": [sample], "token_budget": tokens},
        "extract": {"layer": LAYER, "hook": "resid_post", "ctx_len": CTX_LEN, "batch_size": 16, "exclude_first": 1},
        "store": {"root": str(root / "acts"), "contexts_per_shard": 16, "row_group_rows": 1024, "writer_threads": 1},
    }, "smollm2_sae")
    with ExtractionRunner(ecfg, loaded, show_progress=False) as runner:
        assert runner.run().status in ("completed", "already_complete")
    tcfg = validate(TrainRunConfig, {
        "run_dir": str(root / "sae"),
        "data": {"root": ecfg.store.root, "eval_shards": 1, "partitions": 2, "init_rows": 2048},
        "sae": {"arch": "topk", "d_in": 576, "d_sae": d_sae, "k": 32, "dead_tokens": 50_000,
                "b_dec_init": "geometric_median", "normalize_input": True},
        "train": {"batch_size": 512, "steps": steps, "lr": 2e-3, "warmup_steps": 10, "log_every": 25, "seed": 0},
        "eval": {"max_rows": 4096, "batch_size": 1024, "histogram": False},
        "checkpoint": {"every_steps": steps, "keep_last": 1},
    }, "smollm2_sae")
    with Trainer(tcfg, show_progress=False) as trainer:
        assert trainer.fit().status == "completed"
    run_dir = Path(tcfg.run_dir)
    return SmolLM2SAE(Path(ecfg.store.root), run_dir, run_dir / "final", ecfg, tcfg)

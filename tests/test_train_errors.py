"""Bad input to `saepipe train` is one line on stderr, exit code 2, before any step: nothing trained, nothing written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.config.schema import StoreConfig
from pipeline.config.train import TrainRunConfig
from pipeline.store import DatasetMeta, TaskWriter
from pipeline.train.trainer import Trainer

from helpers.stopping import StopAfterStep
from helpers.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    # 3 shards of 256 rows in row groups of 128.
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "acts", d=32, shards=3, rows_per_shard=256,
                                   row_group_rows=128)


@pytest.fixture(scope="module")
def empty_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("empty") / "acts"
    meta = DatasetMeta(model="synthetic", layer=0, hook="resid_post", d_model=32, ctx_len=65, partitioning={"num_tasks": 1})
    with TaskWriter(root, meta, 0, 1, StoreConfig(root=str(root))) as writer:
        writer.finish(skips={}, stats={})
    return root


def config(tmp_path: Path, root: Path, **sections) -> Path:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"root": str(root), "eval_shards": 1, "partitions": 2, "init_rows": 128},
        "sae": {"arch": "topk", "d_in": 32, "d_sae": 64, "k": 4},
        "train": {"batch_size": 64, "steps": 3, "threads": 1},
        "eval": {"max_rows": 128, "histogram": False},
    }
    for key, value in sections.items():
        cfg[key].update(value)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_fails(capsys, tmp_path: Path, argv: list[str], *expected: str) -> str:
    rc = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err
    run = tmp_path / "run"  # before the first step: no checkpoint, no metrics, no export
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists() and not (run / "final").exists()
    return err


def test_d_in_must_match_the_dataset(capsys, tmp_path, dataset):
    run_fails(capsys, tmp_path, [str(config(tmp_path, dataset)), "sae.d_in=48"], "sae.d_in is 48", "d_model 32")


def test_unknown_architecture(capsys, tmp_path, dataset):
    run_fails(capsys, tmp_path, [str(config(tmp_path, dataset)), "sae.arch=gated"], "sae.arch", "topk")


def test_dataset_without_shards(capsys, tmp_path, empty_dataset):
    run_fails(capsys, tmp_path, [str(config(tmp_path, empty_dataset))], "has no shards")


def test_missing_dataset(capsys, tmp_path):
    run_fails(capsys, tmp_path, [str(config(tmp_path, tmp_path / "nowhere"))], "dataset.json", "missing")


def test_fewer_rows_than_one_global_batch(capsys, tmp_path, dataset):
    # 2 training shards of 256 rows, batch 1024.
    run_fails(capsys, tmp_path, [str(config(tmp_path, dataset)), "train.batch_size=1024"],
              "512 training rows", "train.batch_size=1024")


def test_no_shard_left_for_training(capsys, tmp_path, dataset):
    run_fails(capsys, tmp_path, [str(config(tmp_path, dataset)), "data.eval_shards=3"], "data.eval_shards", "leaves none")


def test_more_partitions_than_row_groups_can_fill(capsys, tmp_path, dataset):
    # 4 training row groups of 128 rows for 8 partitions: some get none.
    run_fails(capsys, tmp_path, [str(config(tmp_path, dataset)), "data.partitions=8", "train.batch_size=256"],
              "data.partitions")


def test_batch_must_split_into_partitions(capsys, tmp_path, dataset):
    run_fails(capsys, tmp_path, [str(config(tmp_path, dataset)), "train.batch_size=63"], "train.batch_size 63", "data.partitions 2")


def test_run_length_is_required_once(capsys, tmp_path, dataset):
    run_fails(capsys, tmp_path, [str(config(tmp_path, dataset)), "train.tokens=1000"], "exactly one of `tokens` or `steps`")


def test_unknown_key(capsys, tmp_path, dataset):
    run_fails(capsys, tmp_path, [str(config(tmp_path, dataset)), "train.learning_rate=1"], "train.learning_rate", "unknown key")


def test_existing_checkpoints_need_resume_and_the_same_sae(capsys, tmp_path, dataset):
    path = config(tmp_path, dataset)
    stop = StopAfterStep(2)  # a run stopped part-way: checkpoints, no finished status
    with Trainer(load_config(TrainRunConfig, path), stop=stop, callbacks=[stop]) as trainer:
        assert trainer.fit().status == "preempted"
    capsys.readouterr()
    cfg = str(path)
    for argv, expected in (([cfg], "--resume"), ([cfg, "--resume", "sae.d_sae=128"], "config keys changed since the checkpoint: sae")):
        assert main(["train", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


def test_a_finished_run_says_so_and_exits_0(capsys, tmp_path, dataset):
    cfg = str(config(tmp_path, dataset))
    assert main(["train", cfg]) == 0
    run = tmp_path / "run"
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    for argv in ([cfg], [cfg, "--resume"]):
        assert main(["train", *argv]) == 0
        assert "already finished at step 3" in capsys.readouterr().out
    # nothing rewritten: not the checkpoint, the evaluation, the export or the metrics
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == stamps
    # another config in the same run_dir is not "finished": it goes the resume way and is refused there
    assert main(["train", cfg, "--resume", "sae.d_sae=128"]) == 2


def test_tokens_round_up_to_whole_steps(tmp_path, dataset):
    from pipeline.config import load_config
    from pipeline.config.train import TrainRunConfig

    cfg = load_config(TrainRunConfig, config(tmp_path, dataset), ["train.steps=null", "train.tokens=1000"])
    assert cfg.train.total_steps == int(np.ceil(1000 / 64))

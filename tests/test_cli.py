"""First-use paper cuts of the `saepipe` command: bad input is one line and exit 2, checksums are checked where it
matters, options go before or after the subcommand, and the config keys can be listed."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import __version__
from pipeline.cli.main import main
from pipeline.config import ExtractRunConfig
from pipeline.config.analysis import AnalysisRunConfig
from pipeline.config.label import LabelRunConfig
from pipeline.config.reference import config_keys, markdown_table
from pipeline.config.sweep import SweepConfig
from pipeline.config.train import TrainRunConfig

from conftest import REPO
from helpers.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "acts", d=32, shards=4, rows_per_shard=256,
                                   row_group_rows=128)


def train_config(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "data": {"root": str(root), "eval_shards": 1, "partitions": 2, "init_rows": 128},
        "sae": {"arch": "topk", "d_in": 32, "d_sae": 64, "k": 4},
        "train": {"batch_size": 64, "steps": 2, "threads": 1},
        "eval": {"max_rows": 128, "histogram": False},
    }))
    return path


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_lookup_out_of_range_is_one_line(store, capsys):
    for row in ("1024", "-1", "99999"):
        err = one_line_error(capsys, ["lookup", str(store), row])
        assert "out of range" in err and "1024 rows (0 .. 1023)" in err


def test_verify_finds_two_flipped_bytes_and_training_refuses_the_store(store, tmp_path, capsys):
    assert main(["verify", str(store), "--no-progress"]) == 0
    assert "4 shards" in capsys.readouterr().out
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    shard = sorted(damaged.glob("tasks/*/acts-000002.parquet"))[0]
    data = bytearray(shard.read_bytes())
    for at in (len(data) // 3, len(data) // 2):  # inside the activations, same size: only the checksum can tell
        data[at] ^= 0x10
    shard.write_bytes(bytes(data))
    assert main(["info", str(damaged)]) == 0  # info reads the footer only and says it did not verify
    assert "not verified" in capsys.readouterr().out
    assert main(["verify", str(damaged), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "acts-000002.parquet" in out and "xxh3 checksum" in out and "1 of 8 shard files" in err
    err = one_line_error(capsys, ["train", str(train_config(tmp_path, damaged))])
    assert "fail their checksum" in err and "acts-000002.parquet" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_training_refuses_an_incomplete_store_unless_told(store, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(store, partial)
    manifest = next(partial.glob("tasks/*/manifest.json"))
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    err = one_line_error(capsys, ["train", str(train_config(tmp_path, partial))])
    assert "not complete" in err and "data.allow_incomplete" in err
    assert main(["train", str(train_config(tmp_path, partial)), "data.allow_incomplete=true"]) == 0


def test_the_trainer_log_says_what_precision_it_uses(store, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(["train", str(train_config(tmp_path, store)), "--no-progress"]) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training topk"))
    assert "fp32" in line and ", no;" not in line


def test_options_go_before_or_after_the_subcommand_and_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"saepipe {__version__}"
    for argv in (["-v", "config", "keys", "train"], ["config", "keys", "train", "-v"]):
        assert main(argv) == 0
        assert "sae.d_sae" in capsys.readouterr().out


def test_a_validator_message_does_not_repeat_itself(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"corpus": {"paths": ["x"]}, "extract": {"layer": 1}, "store": {"root": "r"},
                                      "task": {"task_id": 3, "num_tasks": 2}}))
    err = one_line_error(capsys, ["extract", str(config)])
    assert "task: task_id 3 must be < num_tasks 2" in err and "Value error" not in err and "task: task:" not in err


def test_config_keys_list_every_key_with_help_text(capsys):
    for kind, model in (("extract", ExtractRunConfig), ("train", TrainRunConfig), ("analysis", AnalysisRunConfig),
                        ("label", LabelRunConfig), ("sweep", SweepConfig)):
        assert main(["config", "keys", kind]) == 0
        out = capsys.readouterr().out
        keys = config_keys(model)
        assert all(k.help for k in keys), [k.name for k in keys if not k.help]
        assert [line.split()[0] for line in out.splitlines()] == [k.name for k in keys]


def test_readme_config_reference_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    for model in (ExtractRunConfig, TrainRunConfig, AnalysisRunConfig, LabelRunConfig, SweepConfig):
        assert markdown_table(model) in readme, f"README's {model.__name__} table is stale: `saepipe config keys --markdown`"


def test_show_resolves_a_config_with_its_defaults(capsys):
    assert main(["config", "show", "train", str(REPO / "configs" / "sae-demo.yaml"), "sae.k=8"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["sae"]["k"] == 8 and shown["train"]["betas"] == [0.9, 0.999] and re.match(r"runs/", shown["run_dir"])

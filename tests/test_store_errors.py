"""Bad datasets fail with a StoreError of one line that names the offending file."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from pipeline.store import ActivationDataset, StoreError, TaskWriter

from test_store import build_dataset, make_cfg, make_meta, make_shard


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("errors") / "ds", num_tasks=2, shards_per_task=2).root


@pytest.fixture
def root(pristine, tmp_path) -> Path:
    copy = tmp_path / "ds"
    shutil.copytree(pristine, copy)
    return copy


def fails(root: Path, names: str, **kw) -> str:
    with pytest.raises(StoreError) as err:
        ActivationDataset.open(root, **kw)
    message = str(err.value)
    assert "\n" not in message, message
    assert names in message, message
    return message


def acts_file(root: Path, task: int = 1, index: int = 1) -> Path:
    return root / "tasks" / f"task-{task:05d}-of-00002" / f"acts-{index:06d}.parquet"


def test_d_model_mismatch_names_dataset_json(root):
    message = fails(root, str(root / "dataset.json"), expected_d_model=576)
    assert "576" in message and "32" in message
    ActivationDataset.open(root, expected_d_model=32)


def test_missing_shard_names_the_file(root):
    acts_file(root).unlink()
    fails(root, str(acts_file(root)))


def test_missing_ctx_file_names_the_file(root):
    ctx = root / "tasks" / "task-00000-of-00002" / "ctx-000000.parquet"
    ctx.unlink()
    fails(root, str(ctx))


def test_truncated_shard_names_the_file(root):
    path = acts_file(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in fails(root, str(path))


def test_damaged_footer_of_the_listed_size_names_the_file(root):
    path = acts_file(root, 0, 0)
    data = bytearray(path.read_bytes())
    data[-12:-4] = b"\xff" * 8  # footer length and the end of the footer
    path.write_bytes(bytes(data))
    fails(root, str(path))


def test_flipped_byte_is_caught_by_verify(root):
    path = acts_file(root, 0, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))
    ActivationDataset.open(root)  # sizes and footers are fine
    assert "checksum" in fails(root, str(path), verify=True)


def test_missing_dataset_json_names_it(root):
    (root / "dataset.json").unlink()
    fails(root, str(root / "dataset.json"))


def test_wrong_schema_version_names_dataset_json(root):
    path = root / "dataset.json"
    meta = json.loads(path.read_text())
    meta["schema_version"] = 99
    path.write_text(json.dumps(meta))
    assert "schema_version" in fails(root, str(path))
    meta["schema_version"] = 1  # the byte-plane layout before the high plane moved to zstd frames
    path.write_text(json.dumps(meta))
    assert "extract again into a fresh root" in fails(root, str(path))


def test_unknown_layout_names_dataset_json(root):
    path = root / "dataset.json"
    meta = json.loads(path.read_text())
    meta["layout"] = "fp8-something"
    path.write_text(json.dumps(meta))
    assert "fp8-something" in fails(root, str(path))


def test_malformed_manifest_names_it(root):
    path = root / "tasks" / "task-00001-of-00002" / "manifest.json"
    path.write_text("{ not json")
    fails(root, str(path))


def test_second_task_with_different_meta_names_dataset_json_and_the_keys(root):
    other = make_meta(2, layer=7, hook="mlp_out")
    with pytest.raises(StoreError) as err:
        TaskWriter(root, other, 1, 2, make_cfg(root))
    message = str(err.value)
    assert "\n" not in message and str(root / "dataset.json") in message
    assert "layer" in message and "hook" in message and "d_model" not in message


def test_task_count_differing_from_the_dataset_names_the_file(root):
    with pytest.raises(StoreError) as err:
        TaskWriter(root, make_meta(2), 0, 3, make_cfg(root))
    assert "\n" not in str(err.value) and "dataset.json" in str(err.value)


def test_incomplete_task_warns_or_fails_when_completeness_is_required(root, caplog):
    manifest = root / "tasks" / "task-00001-of-00002" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["complete"] = False
    manifest.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="pipeline.store.reader"):
        ds = ActivationDataset.open(root)
    assert ds.num_shards == 4
    assert any("task-00001-of-00002 is not complete" in r.getMessage() for r in caplog.records)
    fails(root, "task-00001-of-00002", require_complete=True)


def test_missing_task_directory_makes_the_dataset_incomplete(root):
    shutil.rmtree(root / "tasks" / "task-00001-of-00002")
    assert ActivationDataset.open(root).num_shards == 2
    assert "task(s) 1 of 2" in fails(root, str(root / "tasks"), require_complete=True)


def test_listed_shard_missing_when_a_task_restarts_names_it(root):
    acts_file(root, 0, 0).unlink()
    with pytest.raises(StoreError) as err:
        TaskWriter(root, make_meta(2), 0, 2, make_cfg(root))
    assert "\n" not in str(err.value) and str(acts_file(root, 0, 0)) in str(err.value)


def test_tokenizer_missing_for_lookup_names_the_directory(root):
    shutil.rmtree(root / "tokenizer")
    ds = ActivationDataset.open(root)
    with pytest.raises(StoreError, match="tokenizer"):
        ds.lookup(0)


def test_valid_copy_opens(root):
    shard = make_shard(0, 0)
    ds = ActivationDataset.open(root, verify=True, require_complete=True)
    assert ds.num_shards == 4 and ds.read_acts(0).shape == shard.rows.acts.shape

"""An extraction task as a cluster runs it: two processes on one task (one proceeds, the other refuses), a finished
task re-run (returns at once, touches nothing), a stop request (commits, resumes), and config mistakes caught before
the model loads or anything is written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli.main import main
from pipeline.config import ExtractRunConfig, load_config
from pipeline.extract.runner import ExtractionRunner
from pipeline.store import ActivationDataset

from conftest import REPO, SAMPLE
from helpers.stopping import StopAfterShards

TASK = Path("tasks") / "task-00000-of-00001"


def write_config(path: Path, root: Path, **corpus) -> Path:
    path.write_text(yaml.safe_dump({
        "corpus": {"paths": [SAMPLE], "token_budget": 4000, **corpus},
        "extract": {"layer": 2, "ctx_len": 32, "batch_size": 8},
        "store": {"root": str(root), "contexts_per_shard": 16, "row_group_rows": 128},
    }))
    return path


def cli(*argv: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def snapshot(root: Path):
    ds = ActivationDataset.open(root, require_complete=True)
    return ([ds.read_metadata(i) for i in range(ds.num_shards)],
            [ds.read_acts(i).view(torch.int16) for i in range(ds.num_shards)])


def assert_same_rows(a: Path, b: Path) -> None:
    (meta_a, acts_a), (meta_b, acts_b) = snapshot(a), snapshot(b)
    assert len(meta_a) == len(meta_b) > 1
    for ma, mb, xa, xb in zip(meta_a, meta_b, acts_a, acts_b):
        assert ma.equals(mb) and torch.equal(xa, xb)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the task, with its progress bar."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = cli("extract", str(write_config(tmp / "c.yaml", tmp / "ds")))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # the bar counts what the budget counts (tokens, BOS aside), so it ends at 100% of it
    bar = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("extract task 0")]
    assert bar and "100%" in bar[-1] and "4.00k/4.00k" in bar[-1], bar[-1:]
    return tmp / "ds"


@pytest.mark.slow
def test_two_processes_on_one_task_one_proceeds_the_other_refuses(tmp_path, reference):
    config = write_config(tmp_path / "c.yaml", tmp_path / "ds")
    procs = [cli("extract", str(config), "--no-progress") for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, _, err in results if rc == 2)
    line = refused.strip().splitlines()[-1]
    assert line.startswith("saepipe extract: error: extraction task 0 of 1") and "is held by pid" in line, refused
    # the refusal came before the model: the refusing process logged no model load
    assert "dequantising" not in refused and "Loading" not in refused
    proceeded = next(err for rc, _, err in results if rc == 0)
    assert "Loading weights" not in proceeded and "it/s]" not in proceeded  # --no-progress: no bar, not even transformers'
    assert "already complete" not in proceeded
    assert_same_rows(reference, tmp_path / "ds")
    assert not (tmp_path / "ds" / TASK / "lease.json").exists()


def test_a_finished_task_returns_at_once_and_touches_nothing(reference):
    manifest = reference / TASK / "manifest.json"
    before = manifest.read_bytes(), manifest.stat().st_mtime_ns
    config = REPO / "configs" / "demo.yaml"  # any config file: the overrides below make it the reference's
    cfg_overrides = [f"store.root={reference}", f"corpus.paths=[{SAMPLE}]", "corpus.token_budget=4000",
                     "extract.layer=2", "extract.ctx_len=32", "extract.batch_size=8", "extract.exclude_first=0",
                     "store.contexts_per_shard=16", "store.row_group_rows=128", "store.writer_threads=2"]
    # In a fresh interpreter: the answer must not need torch (no model, no tokenizer), which is what makes it fast.
    code = ("import sys; from pipeline.cli.main import main; rc = main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code, "extract", str(config), *cfg_overrides], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    wall = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr
    assert "already complete" in run.stdout and run.stdout.strip().endswith("NO-TORCH"), run.stdout
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before
    print(f"finished-task rerun: {wall:.2f} s wall (interpreter start included)")


@pytest.mark.slow
def test_a_stop_request_commits_and_the_next_run_resumes(tmp_path, smollm2):
    # the reference in this process too: CPU kernels' last bits follow the thread count, which a test may have set
    straight = load_config(ExtractRunConfig, write_config(tmp_path / "s.yaml", tmp_path / "straight"))
    with ExtractionRunner(straight, smollm2, show_progress=False) as runner:
        assert runner.run().status == "completed"
    cfg = load_config(ExtractRunConfig, write_config(tmp_path / "c.yaml", tmp_path / "ds"))
    stop = StopAfterShards(2)
    with ExtractionRunner(cfg, smollm2, stop=stop, callbacks=[stop], show_progress=False) as runner:
        result = runner.run()
    assert result.status == "stopped" and "after 2 shards" in result.stop_reason
    manifest = json.loads((tmp_path / "ds" / TASK / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) >= 2
    with ExtractionRunner(cfg, smollm2, show_progress=False) as runner:
        assert runner.run().status == "completed"
    assert_same_rows(tmp_path / "straight", tmp_path / "ds")


class Events:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, args))


@pytest.mark.slow
def test_the_runner_reports_setup_batches_commits_skips_and_the_end(tmp_path, smollm2):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "A first good document with some words in it."}\nnot json\n{"meta": {}}\n'
                   '{"text": "Another good one, long enough to make a context or two of tokens."}\n')
    cfg = load_config(ExtractRunConfig, write_config(tmp_path / "c.yaml", tmp_path / "ds"),
                      [f"corpus.paths=[{bad}]", "corpus.token_budget=null"])
    events = Events()
    with ExtractionRunner(cfg, smollm2, callbacks=[events], show_progress=False) as runner:
        result = runner.run()
    names = [n for n, _ in events.calls]
    assert names[0] == "on_setup" and names[-1] == "on_finish" and "on_batch" in names
    committed = [a[0] for n, a in events.calls if n == "on_shard_committed"]
    assert [c["index"] for c in committed] == list(range(len(result.manifest["shards"])))
    assert committed[-1]["total_rows"] == result.manifest["rows"]
    skips = {a[0]: a[1] for n, a in events.calls if n == "on_skip"}
    assert skips == {"invalid_json": 1, "missing_text": 1} == result.manifest["skips"]
    batch = next(a[0] for n, a in events.calls if n == "on_batch")
    assert {"tokens", "padded_tokens", "forward_seconds", "pending_shards", "prefetched_shards"} <= batch.keys()
    phases = [a[0] for n, a in events.calls if n == "on_write_phase"]
    assert phases[:5] == ["before_write", "tmp_written", "ctx_renamed", "acts_renamed", "manifest_written"]


def test_a_glob_matching_nothing_fails_before_anything_is_written(tmp_path, capsys):
    root = tmp_path / "ds"
    config = write_config(tmp_path / "c.yaml", root, paths=[str(tmp_path / "nothing-*.jsonl.zst")])
    assert main(["extract", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no file matches" in err and "nothing-*.jsonl.zst" in err
    assert not root.exists()


def test_a_config_for_another_dataset_is_refused_naming_every_differing_key_in_full(reference, tmp_path, capsys):
    long_path = str(tmp_path / ("a-rather-long-directory-name-" * 3) / "*.jsonl.zst")
    config = write_config(tmp_path / "c.yaml", reference)
    rc = main(["extract", str(config), "--no-progress", "extract.layer=3", f"corpus.paths=[{SAMPLE}, {long_path}]"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    # the corpus check comes first: the second pattern matches nothing
    assert "no file matches" in err
    rc = main(["extract", str(config), "--no-progress", "extract.layer=3", "corpus.token_budget=5000"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "layer: stored 2 vs this config's 3" in err and "token_budget: stored 4000 vs this config's 5000" in err
    assert "corpus.token_budget: stored 4000 vs this config's 5000" in err

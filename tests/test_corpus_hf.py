"""Corpus stream over a `datasets` streaming source, read from local files only (the hub is never touched)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import random  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import zstandard  # noqa: E402

from pipeline.config.schema import CorpusConfig, HFSource  # noqa: E402
from pipeline.corpus import CorpusError, CorpusStream, make_plan  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # The env vars above only count if `datasets` was not imported earlier in this session.
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def word_tokenize(texts: list[str]) -> list[list[int]]:
    return [[zlib.crc32(w.encode()) % 1000 for w in t.split()] for t in texts]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(f"w{rng.randrange(300)}" for _ in range(rng.randint(1, 30))),
             "meta": {"pile_set_name": rng.choice(["A", "B", "C"])}} for _ in range(n)]


def write(path: Path, rows: list[dict]) -> Path:
    data = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if path.name.endswith(".zst") else data)
    return path


def hf_cfg(files: list[Path], **kw) -> CorpusConfig:
    return CorpusConfig(hf=HFSource(name="json", split="train", data_files=[str(f) for f in files]), **kw)


def key(d) -> tuple:
    return d.index, d.doc_id, d.subset, tuple(d.token_ids.tolist()), json.dumps(d.state_before, sort_keys=True)


def test_hf_json_source_gives_the_same_records_as_the_file_source(tmp_path):
    rows = make_rows(60)
    packed = write(tmp_path / "rows.jsonl.zst", rows)
    from_files = list(CorpusStream(CorpusConfig(paths=[str(packed)], tokenize_batch=8), word_tokenize))
    from_hf = list(CorpusStream(hf_cfg([packed], tokenize_batch=8), word_tokenize))
    assert [(d.subset, d.token_ids.tolist()) for d in from_hf] == [(d.subset, d.token_ids.tolist()) for d in from_files]
    assert [d.doc_id for d in from_hf] == [f"json:train:{i}" for i in range(60)]


def test_hf_bad_rows_are_counted_and_meta_strings_parsed(tmp_path):
    rows = [{"text": "kept", "meta": {"pile_set_name": "A"}}, {"text": "", "meta": {"pile_set_name": "B"}},
            {"meta": {"pile_set_name": "C"}}, {"text": "no meta"}, {"text": " \n", "meta": {"pile_set_name": "A"}}]
    stream = CorpusStream(hf_cfg([write(tmp_path / "bad.jsonl", rows)]), word_tokenize)
    assert [(d.index, d.subset) for d in stream] == [(0, "A"), (3, "unknown")]
    assert stream.skips == {"empty_text": 2, "missing_text": 1}
    as_strings = [{"text": "x y", "meta": json.dumps({"pile_set_name": "Pile-CC"})}, {"text": "z", "meta": "{not json"}]
    stream = CorpusStream(hf_cfg([write(tmp_path / "strings.jsonl", as_strings)]), word_tokenize)
    assert [d.subset for d in stream] == ["Pile-CC", "unknown"]


def test_hf_plan_splits_at_dataset_shards_and_resume_matches_the_uninterrupted_stream(tmp_path):
    """Several data files are several dataset shards: the plan's units follow them, and a task's unit starts at its
    own shard instead of streaming the ones before it."""
    rows = make_rows(120, seed=1)
    rows[10]["text"] = ""  # a bad row in the first shard
    files = [write(tmp_path / f"r{i}.jsonl", rows[i * 40 : (i + 1) * 40]) for i in range(3)]
    config = hf_cfg(files, token_budget=900, subset_quotas={"A": 250}, tokenize_batch=6)
    single = CorpusStream(config, word_tokenize)
    whole = [(d.index, d.doc_id, tuple(d.token_ids.tolist())) for d in single]
    assert single.stats["tokens_selected"] == 900 and single.skips == {"empty_text": 1}
    plan = make_plan(config, word_tokenize, tokenizer="words", ctx_len=9, num_tasks=3)
    assert len({u.source_part for u in plan.units}) >= 2  # the budget reaches into a later shard
    got, skips = [], {}
    for unit in plan.units:
        stream = CorpusStream(config, word_tokenize, resume=json.loads(json.dumps(unit.start)), stop_at=unit.stop)
        got += [(d.index, d.doc_id, tuple(d.token_ids.tolist())) for d in stream]
        for reason, n in stream.skips.items():
            skips[reason] = skips.get(reason, 0) + n
        if unit.start["position"][0] > 0:  # a unit in a later shard starts reading there
            assert unit.start["position"][1] == 0 or unit.start["next_index"] > 40
    assert got == whole and skips == single.skips
    full = list(CorpusStream(config, word_tokenize))
    at = len(full) // 2
    resumed = CorpusStream(config, word_tokenize, resume=json.loads(json.dumps(full[at].state_before)))
    assert [key(d) for d in resumed] == [key(d) for d in full[at:]]
    assert resumed.stats == single.stats and resumed.skips == single.skips


def test_an_unreadable_hf_source_is_a_one_line_corpus_error(tmp_path):
    path = write(tmp_path / "broken.jsonl.zst", make_rows(20))
    data = bytearray(path.read_bytes())
    data[20:40] = b"x" * 20
    path.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match="hf dataset 'json'") as err:
        list(CorpusStream(hf_cfg([path]), word_tokenize))
    assert "\n" not in str(err.value)

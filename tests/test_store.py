"""Activation store: lossless round trip, manifests, lookup, shuffled batches, ordered commits, restart and crash safety."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import xxhash

from pipeline.config.schema import StoreConfig
from pipeline.errors import StoreError
from pipeline.store import ActivationDataset, ContextRows, DatasetMeta, ShardRows, TaskWriter
from pipeline.store import writer as writer_module

REPO = Path(__file__).resolve().parents[1]
D = 32
CTX_LEN = 16
CONTEXTS_PER_SHARD = 6
ROW_GROUP = 32

# bf16 bit patterns a lossless store must keep exactly
SPECIAL_BITS = np.array([
    0x7F7F, 0xFF7F,  # ±3.39e38, the largest finite
    0x0080, 0x8080,  # ±1.18e-38, the smallest normal
    0x0001, 0x8001, 0x007F,  # subnormals
    0x0000, 0x8000,  # ±0
    0x7F80, 0xFF80,  # ±inf
    0x7FC1, 0xFFA5, 0x7F81,  # NaNs with payloads (quiet, negative, signalling)
], dtype=np.uint16).view(np.int16)

TEXTS = [
    "The quick brown fox jumps over the lazy dog while sparse autoencoders learn features from activations.",
    "Residual streams carry information between layers; dictionaries of features explain them.",
    "Café naïve résumé: unicode text survives the byte level tokenizer and its decoder, hopefully intact.",
    "Shards are written atomically, committed in order and resumed after a crash without losing rows.",
]


# ---- building datasets ----------------------------------------------------------------------------------------------


def make_tokenizer(path: Path):
    """A tiny byte-level BPE trained here (no downloads), saved like a real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXTS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = make_tokenizer(None)
    return _TOKENIZER


def make_meta(num_tasks: int = 2, d: int = D, **overrides) -> DatasetMeta:
    fields = dict(model="tiny-test-model", revision="abc", layer=3, hook="resid_post", d_model=d, ctx_len=CTX_LEN,
                  exclude_first=0, bos_token_id=0, tokenizer={"source": "test", "dir": "tokenizer"},
                  corpus={"paths": ["x.jsonl"]}, partitioning={"num_tasks": num_tasks, "scheme": "test"}, token_budget=None)
    fields.update(overrides)
    return DatasetMeta(**fields)


def make_cfg(root: Path, **kw) -> StoreConfig:
    return StoreConfig(root=str(root), contexts_per_shard=CONTEXTS_PER_SHARD, row_group_rows=kw.pop("row_group_rows", ROW_GROUP), **kw)


@dataclass
class Shard:
    rows: ShardRows
    contexts: ContextRows
    cursor: dict
    skips: dict


def make_shard(task: int, index: int, *, d: int = D, seed: int | None = None, n_contexts: int = CONTEXTS_PER_SHARD) -> Shard:
    """Contexts cut from the tokenized texts, one row per non-BOS token, random bf16 bits (all patterns possible)."""
    g = np.random.default_rng(seed if seed is not None else 1000 * task + index)
    tok = tokenizer()
    ids = np.concatenate([np.array(tok(t, add_special_tokens=False)["input_ids"], dtype=np.int32) for t in TEXTS])
    first = (task * 100 + index) * n_contexts
    ctx_ids, docs, subsets, starts, token_ids = [], [], [], [], []
    row_cid, row_pos, row_tok, row_doc, row_subset = [], [], [], [], []
    for k in range(n_contexts):
        cid = first + k
        length = CTX_LEN if k % 3 else CTX_LEN - 5  # some contexts end early, like at a document's end
        start = int(g.integers(0, len(ids) - length))
        tokens = np.concatenate([[tok.bos_token_id], ids[start : start + length - 1]]).astype(np.int32)
        doc, subset = f"doc-{task}-{cid // 2}", ["Pile-CC", "Github", "ArXiv"][cid % 3]
        ctx_ids.append(cid), docs.append(doc), subsets.append(subset), starts.append(start), token_ids.append(tokens)
        for pos in range(1, len(tokens)):
            row_cid.append(cid), row_pos.append(pos), row_tok.append(tokens[pos]), row_doc.append(doc), row_subset.append(subset)
    n = len(row_cid)
    bits = g.integers(-32768, 32768, size=(n, d), dtype=np.int16)
    bits[0, : len(SPECIAL_BITS)] = SPECIAL_BITS[: d]
    acts = torch.from_numpy(bits).view(torch.bfloat16)
    rows = ShardRows(np.array(row_cid, np.int64), np.array(row_pos, np.int32), np.array(row_tok, np.int32),
                     np.array(row_doc, dtype=object), row_subset, acts)
    contexts = ContextRows(np.array(ctx_ids, np.int64), docs, subsets, np.array(starts, np.int32), token_ids)
    return Shard(rows, contexts, cursor={"task": task, "after_shard": index, "nested": {"doc": first}},
                 skips={"empty_text": index, "invalid_json": 2 * index})


@dataclass
class Built:
    root: Path
    shards: list[Shard] = field(default_factory=list)  # in global (task, index) order

    @property
    def acts(self) -> torch.Tensor:
        return torch.cat([s.rows.acts for s in self.shards])


def build_dataset(root: Path, *, num_tasks: int = 2, shards_per_task: int = 3, cfg: StoreConfig | None = None) -> Built:
    built = Built(root)
    cfg = cfg or make_cfg(root)
    for task in range(num_tasks):
        writer = TaskWriter(root, make_meta(num_tasks), task, num_tasks, cfg, save_tokenizer=make_tokenizer)
        for index in range(shards_per_task):
            shard = make_shard(task, index)
            writer.write_shard(shard.rows, shard.contexts, cursor=shard.cursor, skips=shard.skips)
            built.shards.append(shard)
        writer.finish(skips={"empty_text": 99}, stats={"task": task})
    return built


def bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return build_dataset(tmp_path_factory.mktemp("store") / "ds")


@pytest.fixture(scope="module")
def ds(built) -> ActivationDataset:
    return ActivationDataset.open(built.root, verify=True, require_complete=True)


# ---- round trip -----------------------------------------------------------------------------------------------------


def test_round_trip_is_bit_identical(built, ds):
    assert ds.num_shards == len(built.shards) == 6
    assert ds.num_rows == sum(len(s.rows) for s in built.shards)
    assert ds.d_model == D and ds.meta.layout == "bf16-lo-plane+hi-zstd"
    for i, shard in enumerate(built.shards):
        got = ds.read_acts(i)
        assert got.dtype == torch.bfloat16 and got.is_contiguous() and got.shape == (len(shard.rows), D)
        assert np.array_equal(bits(got), bits(shard.rows.acts)), f"shard {i} differs"
    assert np.array_equal(bits(ds.read_acts(0))[0, : len(SPECIAL_BITS)], SPECIAL_BITS)
    as_float = ds.read_acts(1, dtype=torch.float32)
    assert as_float.dtype == torch.float32
    assert torch.equal(as_float.view(torch.int32), built.shards[1].rows.acts.float().view(torch.int32))


def test_global_rows_follow_task_then_shard_order(built, ds):
    assert [(s.task_id, s.index) for s in ds.shards] == [(t, i) for t in range(2) for i in range(3)]
    assert [s.row_offset for s in ds.shards] == list(np.cumsum([0] + [len(s.rows) for s in built.shards])[:-1])
    files = sorted((built.root / "tasks").glob("*/acts-*.parquet"))
    assert files == [s.acts_path for s in ds.shards]


def test_metadata_and_contexts_round_trip(built, ds):
    table = ds.read_metadata()
    assert table.column_names == ["context_id", "pos", "token_id", "doc_id", "subset"]
    assert pa.types.is_dictionary(table.schema.field("doc_id").type)
    assert pa.types.is_dictionary(table.schema.field("subset").type)
    expected_cid = np.concatenate([s.rows.context_id for s in built.shards])
    assert np.array_equal(table.column("context_id").to_numpy(), expected_cid)
    assert table.column("doc_id").to_pylist() == [d for s in built.shards for d in s.rows.doc_id]
    assert ds.read_metadata(2, columns=["pos"]).column("pos").to_pylist() == built.shards[2].rows.pos.tolist()
    with pytest.raises(ValueError, match="act_lo"):
        ds.read_metadata(0, columns=["act_lo"])
    ctx = ds.read_contexts(4)
    assert ctx.column_names == ["context_id", "doc_id", "subset", "doc_start", "token_ids"]
    assert [np.asarray(t) for t in ctx.column("token_ids").to_pylist()][0].tolist() == built.shards[4].contexts.token_ids[0].tolist()
    assert ctx.column("doc_start").to_pylist() == built.shards[4].contexts.doc_start.tolist()


def test_acts_files_use_dictionaries_only_on_doc_and_subset(ds):
    md = pq.ParquetFile(ds.shards[0].acts_path).metadata
    encodings = {md.schema.column(i).name: md.row_group(0).column(i).encodings for i in range(md.num_columns)}
    for name, enc in encodings.items():
        dictionary = any("DICTIONARY" in e for e in enc)
        assert dictionary == (name in ("doc_id", "subset")), (name, enc)
    compression = {md.schema.column(i).name: md.row_group(0).column(i).compression for i in range(md.num_columns)}
    # the high plane arrives as zstd frames already, and the low plane is noise: Parquet compresses neither
    assert compression["act_hi_zst"] == compression["act_lo"] == "UNCOMPRESSED"
    assert {compression[c] for c in ("context_id", "pos", "token_id", "doc_id", "subset")} == {"ZSTD"}


def test_manifest_and_dataset_json(built, ds):
    meta = json.loads((built.root / "dataset.json").read_text())
    assert meta["schema_version"] == 2 and meta["layout"] == "bf16-lo-plane+hi-zstd" and meta["dtype"] == "bfloat16"
    assert meta["tokenizer"]["dir"] == "tokenizer" and meta["partitioning"]["num_tasks"] == 2
    for task in range(2):
        task_dir = built.root / "tasks" / f"task-{task:05d}-of-00002"
        m = json.loads((task_dir / "manifest.json").read_text())
        assert m["complete"] is True and (m["task_id"], m["num_tasks"]) == (task, 2)
        assert [s["index"] for s in m["shards"]] == [0, 1, 2]
        assert m["cursor"] == built.shards[3 * task + 2].cursor  # the last committed shard's cursor
        assert m["skips"] == {"empty_text": 99} and m["stats"] == {"task": task}
        assert m["rows"] == sum(s["rows"] for s in m["shards"])
        for s in m["shards"]:
            for kind in ("acts", "ctx"):
                data = (task_dir / s[f"{kind}_file"]).read_bytes()
                assert len(data) == s[f"{kind}_bytes"]
                assert xxhash.xxh3_64_hexdigest(data) == s[f"{kind}_xxh3"]
            assert sum(s["row_groups"]) == s["rows"] and max(s["row_groups"]) <= ROW_GROUP
            assert s["first_context_id"] < s["last_context_id"]
    assert (built.root / "tokenizer" / "tokenizer.json").exists()
    assert not [p for p in built.root.rglob(".tmp-*")]


def test_second_task_with_identical_meta_is_accepted_and_tokenizer_saved_once(tmp_path):
    calls = []

    def save(path):
        calls.append(path)
        make_tokenizer(path)

    for task in range(2):
        TaskWriter(tmp_path, make_meta(2), task, 2, make_cfg(tmp_path), save_tokenizer=save).close()
    assert len(calls) == 1 and calls[0].name.startswith(".tmp-tokenizer")
    assert (tmp_path / "tokenizer" / "tokenizer_config.json").exists()


def test_empty_shard_round_trips(tmp_path):
    shard = make_shard(0, 0, n_contexts=1)
    empty = ShardRows(shard.rows.context_id[:0], shard.rows.pos[:0], shard.rows.token_id[:0], [], [],
                      shard.rows.acts[:0].contiguous())
    writer = TaskWriter(tmp_path, make_meta(1), 0, 1, make_cfg(tmp_path))
    writer.write_shard(empty, shard.contexts, cursor={}, skips={})
    writer.write_shard(shard.rows, shard.contexts, cursor={}, skips={})
    writer.finish({}, {})
    ds = ActivationDataset.open(tmp_path, verify=True)
    assert ds.num_rows == len(shard.rows) and ds.read_acts(0).shape == (0, D)
    assert ds.locate(0) == (1, 0)
    assert np.array_equal(bits(ds.read_acts(1)), bits(shard.rows.acts))


# ---- lookup ---------------------------------------------------------------------------------------------------------


def test_lookup_decodes_the_token_in_its_context(built, ds):
    tok = tokenizer()
    table = ds.read_metadata()
    for row in (0, 17, ds.num_rows // 2, ds.num_rows - 1):
        hit = ds.lookup(row)
        assert hit.row == row
        assert hit.token_id == table.column("token_id")[row].as_py()
        assert hit.context_id == table.column("context_id")[row].as_py()
        assert hit.doc_id == table.column("doc_id")[row].as_py()
        assert hit.token == tok.decode([hit.token_id])
        assert hit.marked == f"{hit.text_before}«{hit.token}»{hit.text_after}"
        shard, local = ds.locate(row)
        ctx = built.shards[shard].contexts
        tokens = ctx.token_ids[list(ctx.context_id).index(hit.context_id)]
        assert hit.text_before == tok.decode(tokens[1 : hit.pos].tolist())
        assert hit.text_after == tok.decode(tokens[hit.pos + 1 :].tolist())
        text = str(hit)
        assert "\n" not in text and f"«{hit.token}»" in text and hit.subset in text


def test_lookup_with_a_token_window_cuts_the_context(ds):
    positions = ds.read_metadata(0).column("pos").to_pylist()
    row = next(r for r, pos in enumerate(positions) if 5 < pos < 10)
    full, cut = ds.lookup(row), ds.lookup(row, context_tokens=2)
    assert cut.token == full.token
    assert len(cut.text_before) < len(full.text_before) and cut.marked.startswith("…")
    assert full.text_before.endswith(cut.text_before)
    with pytest.raises(IndexError):
        ds.lookup(ds.num_rows)


# ---- batches --------------------------------------------------------------------------------------------------------


def row_ids(ds_acts: torch.Tensor):
    """Map each row's bytes to its global index (rows are random 64-byte strings: unique)."""
    index = {bytes(r): i for i, r in enumerate(bits(ds_acts).view(np.uint8).reshape(len(ds_acts), -1))}
    assert len(index) == len(ds_acts)
    return lambda batch: [index[bytes(r)] for r in bits(batch).view(np.uint8).reshape(len(batch), -1)]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_are_deterministic_and_seed_dependent(built, ds):
    ids = row_ids(built.acts)
    a = [ids(b) for b in take(ds.batches(50, seed=3, dtype=torch.bfloat16, window_row_groups=2), 12)]
    b = [ids(b) for b in take(ds.batches(50, seed=3, dtype=torch.bfloat16, window_row_groups=2), 12)]
    c = [ids(b) for b in take(ds.batches(50, seed=4, dtype=torch.bfloat16, window_row_groups=2), 12)]
    assert a == b and a != c
    f32 = next(ds.batches(50, seed=3, dtype=torch.float32, window_row_groups=2))
    assert f32.dtype == torch.float32 and f32.shape == (50, D) and f32.is_contiguous()


def test_one_epoch_covers_every_row_once_and_shuffles_across_shards(built, ds):
    ids = row_ids(built.acts)
    it = ds.batches(40, seed=1, dtype=torch.bfloat16, window_row_groups=3, loop=False)
    seen = [i for b in it for i in ids(b)]
    assert len(seen) == len(set(seen)) == it.batches_per_epoch * 40
    assert ds.num_rows - len(seen) < 40  # only the last partial batch is dropped
    shard_of = np.searchsorted([s.row_offset for s in ds.shards], seen, side="right") - 1
    assert len(set(shard_of[:40].tolist())) > 1, "a batch mixes rows of several shards"
    assert seen != sorted(seen)


def test_epochs_differ_and_loop_continues(built, ds):
    ids = row_ids(built.acts)
    it = ds.batches(64, seed=2, dtype=torch.bfloat16)
    n = it.batches_per_epoch
    first = [i for b in take(it, n) for i in ids(b)]
    assert it.epoch == 1 and it.offset == 0
    second = [i for b in take(it, n) for i in ids(b)]
    assert first != second and len(set(second)) == len(second)
    assert it.rows_seen == 2 * n * 64


@pytest.mark.parametrize("equal_batches", [True, False])
def test_ranks_are_disjoint_and_cover_all_rows(built, ds, equal_batches):
    ids = row_ids(built.acts)
    world, bs = 3, 16
    per_rank = []
    for rank in range(world):
        it = ds.batches(bs, seed=7, rank=rank, world_size=world, dtype=torch.bfloat16, window_row_groups=2, loop=False,
                        equal_batches=equal_batches)
        per_rank.append([i for b in it for i in ids(b)])
    sets = [set(r) for r in per_rank]
    assert all(len(s) == len(r) for s, r in zip(sets, per_rank))
    for a in range(world):
        for b in range(a + 1, world):
            assert not sets[a] & sets[b]
    # what a rank drops is only the tail of its own units: add it back and the union is every row
    counts = []
    for rank in range(world):
        it = ds.batches(bs, seed=7, rank=rank, world_size=world, loop=False, window_row_groups=2, equal_batches=equal_batches)
        plan = it._plan(0)
        own = {ds.shards[u.shard].row_offset + sum(ds.shards[u.shard].row_groups[: u.group]) + k
               for w in plan.windows for u in w for k in range(u.rows)}
        assert sets[rank] <= own
        counts.append((len(own), len(sets[rank])))
    assert sum(c[0] for c in counts) == ds.num_rows
    if equal_batches:
        assert len({len(r) for r in per_rank}) == 1, "every rank yields the same number of batches"
    else:
        assert all(own - got < bs for own, got in counts)


@pytest.mark.parametrize("consumed", [1, 5, 11])
def test_state_dict_resumes_the_identical_sequence(built, ds, consumed):
    ids = row_ids(built.acts)
    kw = dict(seed=5, dtype=torch.bfloat16, window_row_groups=2)
    it = ds.batches(48, **kw)
    take(it, consumed)
    state = json.loads(json.dumps(it.state_dict()))  # survives JSON
    expected = [ids(b) for b in take(it, 15)]  # crosses windows and the epoch boundary
    fresh = ds.batches(48, **kw)
    fresh.load_state_dict(state)
    assert [ids(b) for b in take(fresh, 15)] == expected
    assert fresh.rows_seen == it.rows_seen
    it.load_state_dict(state)  # rewinding a running iterator works too
    assert [ids(b) for b in take(it, 15)] == expected


def test_state_dict_rejects_another_configuration(ds):
    state = ds.batches(32, seed=1).state_dict()
    with pytest.raises(StoreError, match="batch_size"):
        ds.batches(16, seed=1).load_state_dict(state)
    with pytest.raises(StoreError, match="selected shards"):
        ds.batches(32, seed=1, shards=[0, 1]).load_state_dict(state)


def test_unshuffled_batches_follow_storage_order(built, ds):
    ids = row_ids(built.acts)
    seen = [i for b in ds.batches(25, shuffle=False, dtype=torch.bfloat16, loop=False) for i in ids(b)]
    assert seen == list(range(len(seen)))
    only = [i for b in ds.batches(10, shuffle=False, shards=[4], dtype=torch.bfloat16, loop=False) for i in ids(b)]
    assert only == list(range(ds.shards[4].row_offset, ds.shards[4].row_offset + len(only)))


def test_batch_larger_than_a_rank_share_is_an_error(ds):
    with pytest.raises(StoreError, match="batch_size"):
        ds.batches(ds.num_rows + 1)


# ---- the writer pool ------------------------------------------------------------------------------------------------


def test_shards_finishing_out_of_order_commit_in_order(tmp_path, monkeypatch):
    """Shard 0 is slowest; the manifest must still grow 0, 1, 2, ... and never list a later shard first."""
    original = TaskWriter._write_ctx
    release = threading.Event()

    def slow_first(self, path, contexts):
        if contexts.context_id[0] == 0:
            assert release.wait(10), "shard 1 never finished"
        elif contexts.context_id[0] == CONTEXTS_PER_SHARD:
            release.set()  # shard 1's files are being written while shard 0 waits
        return original(self, path, contexts)

    commits = []
    real_write_json = writer_module.atomic_write_json

    def record(path, obj):
        if Path(path).name == "manifest.json":
            commits.append([s["index"] for s in obj["shards"]])
        real_write_json(path, obj)

    monkeypatch.setattr(TaskWriter, "_write_ctx", slow_first)
    monkeypatch.setattr(writer_module, "atomic_write_json", record)
    cfg = make_cfg(tmp_path, writer_threads=3, max_pending_shards=3)
    writer = TaskWriter(tmp_path, make_meta(1), 0, 1, cfg)
    shards = [make_shard(0, i) for i in range(5)]
    for s in shards:
        writer.write_shard(s.rows, s.contexts, s.cursor, s.skips)
    manifest = writer.finish({}, {})
    assert [s["index"] for s in manifest["shards"]] == [0, 1, 2, 3, 4]
    assert commits[:5] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4]]
    ds = ActivationDataset.open(tmp_path)
    assert all(np.array_equal(bits(ds.read_acts(i)), bits(s.rows.acts)) for i, s in enumerate(shards))


def test_pending_shards_are_bounded(tmp_path, monkeypatch):
    original = TaskWriter._write_acts
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def counting(self, path, rows):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.2)  # long enough for the next shard to be submitted meanwhile
        try:
            return original(self, path, rows)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(TaskWriter, "_write_acts", counting)
    writer = TaskWriter(tmp_path, make_meta(1), 0, 1, make_cfg(tmp_path, writer_threads=4, max_pending_shards=2))
    for i in range(6):
        s = make_shard(0, i)
        writer.write_shard(s.rows, s.contexts, s.cursor, s.skips)
    writer.finish({}, {})
    assert state["max"] == 2


def test_a_worker_error_is_raised_on_the_next_call_and_nothing_after_it_commits(tmp_path, monkeypatch):
    original = TaskWriter._write_acts

    def failing(self, path, rows):
        if path.name.startswith(".tmp-acts-000001"):
            raise OSError("disk full (simulated)")
        return original(self, path, rows)

    monkeypatch.setattr(TaskWriter, "_write_acts", failing)
    writer = TaskWriter(tmp_path, make_meta(1), 0, 1, make_cfg(tmp_path, writer_threads=2, max_pending_shards=2))
    with pytest.raises(OSError, match="disk full"):
        for i in range(6):
            s = make_shard(0, i)
            writer.write_shard(s.rows, s.contexts, s.cursor, s.skips)
        writer.finish({}, {})
    writer.close()
    manifest = json.loads((tmp_path / "tasks" / "task-00000-of-00001" / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0] and manifest["complete"] is False
    assert not list(tmp_path.rglob(".tmp-*"))


def test_invalid_rows_are_rejected_before_queueing(tmp_path):
    writer = TaskWriter(tmp_path, make_meta(1), 0, 1, make_cfg(tmp_path))
    s = make_shard(0, 0)
    bad = ShardRows(s.rows.context_id, s.rows.pos, s.rows.token_id, s.rows.doc_id, s.rows.subset, s.rows.acts.float())
    with pytest.raises(ValueError, match="bfloat16"):
        writer.write_shard(bad, s.contexts, s.cursor, s.skips)
    orphan = ShardRows(s.rows.context_id + 1000, s.rows.pos, s.rows.token_id, s.rows.doc_id, s.rows.subset, s.rows.acts)
    with pytest.raises(ValueError, match="context_id"):
        writer.write_shard(orphan, s.contexts, s.cursor, s.skips)
    with pytest.raises(TypeError):
        writer.write_shard(s.rows, s.contexts, cursor={"x": object()}, skips={})
    assert writer.next_shard_index == 0
    writer.close()


# ---- restart and crashes --------------------------------------------------------------------------------------------


def test_restart_deletes_orphans_and_resumes_after_the_last_commit(tmp_path):
    shards = [make_shard(0, i) for i in range(4)]
    writer = TaskWriter(tmp_path, make_meta(1), 0, 1, make_cfg(tmp_path))
    assert writer.resume_cursor is None and writer.next_shard_index == 0
    for s in shards[:2]:
        writer.write_shard(s.rows, s.contexts, s.cursor, s.skips)
    writer.close()
    task_dir = tmp_path / "tasks" / "task-00000-of-00001"
    orphans = [".tmp-acts-000002.parquet.12345", ".tmp-manifest.json.999", "acts-000002.parquet", "ctx-000002.parquet",
               "ctx-000009.parquet"]
    for name in orphans:
        (task_dir / name).write_bytes(b"partial")
    (task_dir / ".tmp-tokenizer-dir.1").mkdir()

    writer = TaskWriter(tmp_path, make_meta(1), 0, 1, make_cfg(tmp_path))
    assert not [n for n in orphans if (task_dir / n).exists()] and not (task_dir / ".tmp-tokenizer-dir.1").exists()
    assert sorted(p.name for p in task_dir.iterdir()) == sorted(
        ["manifest.json", "lease.json", "acts-000000.parquet", "ctx-000000.parquet", "acts-000001.parquet",
         "ctx-000001.parquet"])
    assert writer.resume_cursor == shards[1].cursor and writer.manifest.skips == shards[1].skips
    assert writer.next_shard_index == 2 and writer.committed_rows == len(shards[0].rows) + len(shards[1].rows)
    for s in shards[2:]:
        writer.write_shard(s.rows, s.contexts, s.cursor, s.skips)
    writer.finish({}, {})
    ds = ActivationDataset.open(tmp_path, verify=True, require_complete=True)
    assert np.array_equal(bits(torch.cat([ds.read_acts(i) for i in range(4)])), bits(torch.cat([s.rows.acts for s in shards])))


CRASH_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import test_store as T
root = Path({root!r})

def kill_at(phase, index):  # SIGKILL: no handler, no flush, no clean-up runs
    if f"{{phase}}:{{index}}" == {crash_at!r}:
        os.kill(os.getpid(), signal.SIGKILL)

# one writer thread: the shards before the crashing one are committed when it starts, so the outcome is exact
writer = T.TaskWriter(root, T.make_meta(1), 0, 1, T.make_cfg(root, writer_threads=1, max_pending_shards=2),
                      on_phase=kill_at)
for i in range(writer.next_shard_index, 4):
    s = T.make_shard(0, i)
    writer.write_shard(s.rows, s.contexts, s.cursor, s.skips)
writer.finish({{}}, {{}})
"""

CRASH_POINTS = ["before_write", "tmp_written", "ctx_renamed", "acts_renamed", "manifest_written"]


def run_writer_process(root: Path, crash_at: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    script = CRASH_SCRIPT.format(tests=str(REPO / "tests"), root=str(root), crash_at=crash_at)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)


def listed_files(task_dir: Path) -> list[str]:
    path = task_dir / "manifest.json"
    shards = json.loads(path.read_text())["shards"] if path.exists() else []
    return sorted(f for s in shards for f in (s["acts_file"], s["ctx_file"]))


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_each_commit_step_leaves_a_consistent_resumable_task(tmp_path, point):
    root = tmp_path / "ds"
    run = run_writer_process(root, f"{point}:1")
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    task_dir = root / "tasks" / "task-00000-of-00001"
    listed = listed_files(task_dir)
    # shard 0 is committed in every case; shard 1 only once its manifest commit happened
    committed = 2 if point == "manifest_written" else 1
    assert listed == sorted(f"{k}-{i:06d}.parquet" for k in ("acts", "ctx") for i in range(committed)), listed
    visible = sorted(p.name for p in task_dir.glob("*.parquet"))
    assert set(listed) <= set(visible)
    assert all(not p.name.startswith(".tmp-") for p in task_dir.glob("acts-*.parquet"))
    ds = ActivationDataset.open(root)  # readers see only committed shards, whatever is on disk
    assert ds.num_shards == committed
    for i in range(committed):
        ds.read_acts(i)

    writer = TaskWriter(root, make_meta(1), 0, 1, make_cfg(root))
    # orphans gone; the killed writer's lease (its pid is dead) taken over
    assert sorted(p.name for p in task_dir.iterdir() if p.name not in ("manifest.json", "lease.json")) == listed
    assert writer.resume_cursor == make_shard(0, committed - 1).cursor
    writer.close()

    rerun = run_writer_process(root, None)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ds = ActivationDataset.open(root, verify=True, require_complete=True)
    assert ds.num_shards == 4
    expected = torch.cat([make_shard(0, i).rows.acts for i in range(4)])
    assert np.array_equal(bits(torch.cat([ds.read_acts(i) for i in range(4)])), bits(expected))
    assert sorted(p.name for p in task_dir.iterdir() if p.name != "manifest.json") == listed_files(task_dir)


def test_a_dropped_iterator_stops_its_threads(ds):
    import gc

    def producers():
        return [t for t in threading.enumerate() if t.name == "store-batches" and t.is_alive()]

    before = len(producers())
    it = ds.batches(16, seed=0, prefetch_batches=1)
    next(it)
    assert len(producers()) == before + 1
    del it
    gc.collect()
    deadline = time.time() + 10
    while len(producers()) > before and time.time() < deadline:
        time.sleep(0.05)
    assert len(producers()) == before


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_reader_threads_run_behind_the_training_threads(ds):
    from pipeline.store.shuffle import READER_NICE

    it = ds.batches(64, seed=0)
    next(it)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    readers = [t for t in threading.enumerate() if t.name.startswith(("store-batches", "store-window"))]
    assert {t.name.split("_")[0] for t in readers} >= {"store-batches", "store-window"}
    assert {os.getpriority(os.PRIO_PROCESS, t.native_id) for t in readers} == {min(19, base + READER_NICE)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller's thread is untouched
    it.close()


def test_a_dead_writers_root_temp_is_removed_at_once_and_a_live_ones_kept(tmp_path):
    """A tokenizer temp directory left by a killed task of this host goes at the next start, not an hour later; one of
    a live process (a task starting now) stays."""
    import subprocess as sp

    from pipeline.io import tmp_path as make_tmp_name

    TaskWriter(tmp_path, make_meta(1), 0, 1, make_cfg(tmp_path)).close()
    dead_pid = int(sp.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    mine = make_tmp_name(tmp_path / "tokenizer").name
    dead = tmp_path / mine.replace(f"~{os.getpid()}~", f"~{dead_pid}~")
    live = tmp_path / mine.replace(f"~{os.getpid()}~", f"~{os.getppid()}~")
    for d in (dead, live):
        d.mkdir()
        (d / "tokenizer.json").write_text("{}")
    TaskWriter(tmp_path, make_meta(1), 0, 1, make_cfg(tmp_path)).close()
    assert not dead.exists() and live.exists()

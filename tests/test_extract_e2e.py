"""End to end on the real SmolLM2: exact reverse lookup, partitioning, bad input through the whole task."""
import json

import numpy as np
import pytest
import torch
import zstandard

from pipeline.config import ExtractRunConfig, validate
from pipeline.errors import CorpusError
from pipeline.extract.hooks import LayerCapture
from pipeline.extract.runner import run_extract
from pipeline.store import ActivationDataset

from conftest import SAMPLE


def make_cfg(root, *, layer=15, budget=6000, ctx_len=64, paths=(SAMPLE,), num_tasks=1, task_id=0, per_shard=16, **corpus):
    return validate(ExtractRunConfig, {
        "corpus": {"paths": list(paths), "token_budget": budget, **corpus},
        "extract": {"layer": layer, "ctx_len": ctx_len, "batch_size": 8},
        "store": {"root": str(root), "contexts_per_shard": per_shard, "row_group_rows": 512},
        "task": {"task_id": task_id, "num_tasks": num_tasks},
    })


def _acts_tables(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((root / "tasks").glob("*/acts-*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=["context_id", "pos", "token_id", "doc_id", "subset"]) for f in files])


def contexts_table(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in sorted((root / "tasks").glob("*/ctx-*.parquet"))])


def all_acts(ds):
    return torch.cat([ds.read_acts(i, dtype=torch.bfloat16) for i in range(ds.num_shards)])


def read_docs(pattern):
    """doc_id -> text, straight from the corpus files with zstandard + json (independent of pipeline.corpus)."""
    import glob
    import io
    import os

    docs = {}
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
            for n, line in enumerate(reader, 1):
                docs[f"{os.path.basename(path)}:{n}"] = json.loads(line)["text"]
    return docs


@pytest.fixture(scope="module")
def demo_ds(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("demo") / "ds"
    run_extract(make_cfg(root), smollm2, show_progress=False)
    return root


def test_every_row_token_is_the_tokenizers_token(demo_ds, smollm2):
    rows = _acts_tables(demo_ds).to_pydict()
    ctx = {c["context_id"]: c for c in contexts_table(demo_ds).to_pylist()}
    docs = read_docs(SAMPLE)
    tok = smollm2.tokenizer
    encoded = {}
    assert len(rows["token_id"]) > 5000
    for cid, pos, token_id, doc_id in zip(rows["context_id"], rows["pos"], rows["token_id"], rows["doc_id"]):
        c = ctx[cid]
        assert c["doc_id"] == doc_id
        if doc_id not in encoded:
            encoded[doc_id] = tok(docs[doc_id], add_special_tokens=False)["input_ids"]
        assert pos >= 1 and c["token_ids"][0] == tok.bos_token_id
        assert c["token_ids"][pos] == token_id
        assert encoded[doc_id][c["doc_start"] + pos - 1] == token_id


def test_rerunning_the_model_reproduces_stored_activations(demo_ds, smollm2):
    ds = ActivationDataset.open(demo_ds, expected_d_model=576)
    meta = _acts_tables(demo_ds)
    acts = all_acts(ds)
    ctx = contexts_table(demo_ds).to_pylist()
    rng = np.random.default_rng(0)
    cids = np.asarray(meta.column("context_id"))
    checked = 0
    with LayerCapture(smollm2.model, 15, "resid_post") as capture:
        for c in rng.choice(ctx, size=6, replace=False):
            fresh = capture(torch.tensor([c["token_ids"]]))[0]
            (idx,) = np.nonzero(cids == c["context_id"])
            pos = np.asarray(meta.column("pos"))[idx]
            stored = acts[idx].float()
            expected = fresh[pos].to(torch.bfloat16).float()
            # A different batch shape may change the last fp32 bits (~1e-5 absolute near zero), which can move bf16
            # rounding by one step.
            ulp = expected.abs() * 2.0 ** -7 + 1e-4
            bad = (stored - expected).abs() > ulp
            assert not bad.any(), (stored[bad][:5], expected[bad][:5], fresh[pos][bad][:5])
            assert (stored == expected).float().mean() > 0.99
            checked += len(idx)
    assert checked > 100


def test_lookup_marks_the_token_in_its_context(demo_ds, smollm2):
    ds = ActivationDataset.open(demo_ds)
    meta = _acts_tables(demo_ds)
    for row in (0, ds.num_rows // 3, ds.num_rows - 1):
        hit = ds.lookup(row)
        assert hit.token_id == meta.column("token_id")[row].as_py()
        assert hit.doc_id == meta.column("doc_id")[row].as_py()
        assert hit.token == smollm2.tokenizer.decode([hit.token_id])
        assert f"«{hit.token}»" in hit.marked


def keyed(root):
    t = _acts_tables(root).to_pydict()
    ctx = {c["context_id"]: (c["doc_start"], len(c["token_ids"])) for c in contexts_table(root).to_pylist()}
    ds = ActivationDataset.open(root)
    acts = all_acts(ds)
    order = {}
    for i, (cid, pos, doc) in enumerate(zip(t["context_id"], t["pos"], t["doc_id"])):
        key = (doc, ctx[cid][0], pos)
        assert key not in order, f"duplicate row {key}"
        order[key] = (cid, t["token_id"][i], i, ctx[cid][1])
    return order, acts


def test_four_tasks_partition_the_one_task_dataset(tmp_path, smollm2):
    one = tmp_path / "one"
    four = tmp_path / "four"
    run_extract(make_cfg(one, layer=2, budget=5000), smollm2, show_progress=False)
    parts = []
    for t in range(4):
        run_extract(make_cfg(four, layer=2, budget=5000, num_tasks=4, task_id=t), smollm2, show_progress=False)
        files = sorted((four / "tasks").glob(f"task-{t:05d}-*/acts-*.parquet"))
        parts.append(files)
    assert all(parts), "every task wrote shards"
    a, acts_a = keyed(one)
    b, acts_b = keyed(four)
    assert set(a) == set(b)
    for key, (cid, token, i, _) in a.items():
        cid_b, token_b, j, _ = b[key]
        assert (cid, token) == (cid_b, token_b), key
    ia = torch.tensor([a[k][2] for k in sorted(a)])
    ib = torch.tensor([b[k][2] for k in sorted(a)])
    x, y = acts_a[ia], acts_b[ib]
    # What holds exactly: keys, tokens and contexts (above). Activations: a context's batch (how many contexts, padded
    # to which width) depends on which other contexts its task holds, and the CPU kernels' blocking follows the
    # batch's shape, moving an fp32 sum by a last bit or so; the bf16 rounding hides most of that. So: bit for bit
    # in almost every row, and otherwise one bf16 step apart (or 1e-4, for values so near 0 that a step is smaller).
    bits_differ = (x.view(torch.int16) != y.view(torch.int16)).any(dim=1)
    step = torch.maximum(x.float().abs(), y.float().abs()) * 2.0 ** -7  # one bf16 step (8 significant bits)
    assert torch.all((x.float() - y.float()).abs() <= step + 1e-4)
    assert bits_differ.float().mean() < 0.05, f"{int(bits_differ.sum())} of {len(x)} rows differ"
    print(f"partitioned vs single task: {int(bits_differ.sum())} of {len(x)} rows differ, by at most one bf16 step")
    # the 4 parts are disjoint: keyed() already failed on any duplicate; and each part is non-trivial
    per_task = [sum(1 for f in files) for files in parts]
    assert min(per_task) >= 1


def write_bad_corpus(path):
    good = [f"good document number {i} about sparse features." for i in range(6)]
    lines = [
        json.dumps({"text": good[0], "meta": {"pile_set_name": "A"}}).encode(),
        b"{not json",
        json.dumps({"meta": {"pile_set_name": "A"}}).encode(),
        json.dumps({"text": good[1], "meta": {"pile_set_name": "B"}}).encode(),
        json.dumps({"text": 42}).encode(),
        b'{"text": "caf\xe9 latin-1 bytes"}',
        json.dumps({"text": ""}).encode(),
        json.dumps({"text": good[2]}).encode(),
        b'{"text": "lone \\ud800 surrogate"}',
        json.dumps({"text": good[3], "meta": {"pile_set_name": "B"}}).encode(),
        json.dumps({"text": "   \n  "}).encode(),
        json.dumps({"text": good[4]}).encode(),
        json.dumps({"text": good[5]}).encode(),
    ]
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    return good


def test_bad_records_are_counted_and_good_ones_kept(tmp_path, smollm2):
    corpus = tmp_path / "bad.jsonl.zst"
    good = write_bad_corpus(corpus)
    root = tmp_path / "ds"
    manifest = run_extract(make_cfg(root, layer=1, budget=None, paths=[str(corpus)], ctx_len=16), smollm2, show_progress=False)
    skips = manifest["skips"]
    for reason in ("invalid_json", "missing_text", "non_string_text", "invalid_utf8", "empty_text"):
        assert skips.get(reason, 0) >= 1, (reason, skips)
    assert sum(skips.values()) == 7
    ctx = contexts_table(root).to_pylist()
    tok = smollm2.tokenizer
    texts = {}
    for c in sorted(ctx, key=lambda c: (c["doc_id"], c["doc_start"])):
        texts.setdefault(c["doc_id"], []).extend(c["token_ids"][1:])
    assert sorted(tok.decode(t) for t in texts.values()) == sorted(good)


def test_truncated_zst_is_found_by_the_plan_and_skip_keeps_every_earlier_record(tmp_path, smollm2):
    docs = [json.dumps({"text": f"record {i} " + "word " * 8}) for i in range(400)]
    # A 1 KiB window gives small zstd blocks; only whole blocks before the cut can be decoded.
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=10)
    blob = zstandard.ZstdCompressor(compression_params=params).compress(("\n".join(docs) + "\n").encode())
    corpus = tmp_path / "cut.jsonl.zst"
    corpus.write_bytes(blob[: len(blob) * 2 // 3])
    # on_corrupt_file: error (the default). The plan reads the whole selection before any model runs, so the damage
    # is found there: one line naming the file, and no dataset started.
    root = tmp_path / "ds"
    with pytest.raises(CorpusError, match="cut.jsonl.zst") as err:
        run_extract(make_cfg(root, layer=1, budget=None, paths=[str(corpus)], ctx_len=64, per_shard=64), smollm2, show_progress=False)
    assert "\n" not in str(err.value) and not root.exists()
    # on_corrupt_file: skip keeps every record in the whole blocks before the damage, and counts the file once.
    manifest = run_extract(make_cfg(root, layer=1, budget=None, paths=[str(corpus)], ctx_len=64, per_shard=64,
                                    on_corrupt_file="skip"), smollm2, show_progress=False)
    assert manifest["skips"] == {"corrupt_file": 1}
    kept = {c["doc_id"] for c in contexts_table(root).to_pylist()}
    assert len(kept) > 100
    assert kept == {f"cut.jsonl.zst:{i}" for i in range(1, len(kept) + 1)}

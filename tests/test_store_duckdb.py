"""The shard files are plain Parquet: pyarrow.dataset and DuckDB query the metadata, and the activations come back with
standard tools (the low plane as bytes per row, the high plane as a standard zstd frame per row group)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
import torch
import zstandard

from test_store import D, ROW_GROUP, build_dataset

duckdb = pytest.importorskip("duckdb")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    built = build_dataset(tmp_path_factory.mktemp("duck") / "ds")
    # litter a crash could leave: readers that glob must not see it
    task_dir = built.root / "tasks" / "task-00000-of-00002"
    (task_dir / ".tmp-acts-000099.parquet.123").write_bytes(b"partial")
    return built


def expected_subsets(built) -> Counter:
    return Counter(s for shard in built.shards for s in shard.rows.subset)


def acts_dataset(root: Path) -> pads.Dataset:
    # ctx-* files have another schema and manifest.json is not Parquet: leave them out by prefix
    return pads.dataset(root / "tasks", format="parquet", ignore_prefixes=[".", "_", "ctx-", "manifest"])


def test_pyarrow_dataset_counts_rows_per_subset(built):
    table = acts_dataset(built.root).to_table(columns=["subset"])
    counts = table.group_by("subset").aggregate([("subset", "count")])
    assert dict(zip(counts.column("subset").to_pylist(), counts.column("subset_count").to_pylist())) == expected_subsets(built)


def test_pyarrow_dataset_filters_on_dictionary_columns(built):
    doc = built.shards[4].rows.doc_id[0]
    table = acts_dataset(built.root).to_table(columns=["context_id", "pos", "doc_id"], filter=pc.field("doc_id") == doc)
    expected = sum(1 for shard in built.shards for d in shard.rows.doc_id if d == doc)
    assert table.num_rows == expected > 0
    assert set(table.column("doc_id").to_pylist()) == {doc}


def test_pyarrow_dataset_reads_the_activation_columns(built):
    table = acts_dataset(built.root).to_table(columns=["act_hi_zst", "act_lo"])
    assert table.num_rows == sum(len(s.rows) for s in built.shards)
    assert {len(v) for v in table.column("act_lo").to_pylist()[:5]} == {D}
    # one frame per row group, on its first row
    groups = sum(len(range(0, len(s.rows), ROW_GROUP)) for s in built.shards)
    assert table.num_rows - table.column("act_hi_zst").null_count == groups


def test_duckdb_counts_rows_per_subset(built):
    glob = str(built.root / "tasks" / "*" / "acts-*.parquet")
    rows = duckdb.sql(f"SELECT subset, count(*) FROM read_parquet('{glob}') GROUP BY subset").fetchall()
    assert dict(rows) == expected_subsets(built)


def test_duckdb_joins_rows_with_their_contexts(built):
    acts = str(built.root / "tasks" / "*" / "acts-*.parquet")
    ctx = str(built.root / "tasks" / "*" / "ctx-*.parquet")
    # lists are 1-based in DuckDB, and token_ids[0] is BOS: the row's token sits at token_ids[pos + 1]
    total, matching, docs_agree = duckdb.sql(f"""
        SELECT count(*), count(*) FILTER (WHERE c.token_ids[a.pos + 1] = a.token_id), count(*) FILTER (WHERE c.doc_id = a.doc_id)
        FROM read_parquet('{acts}') a JOIN read_parquet('{ctx}') c USING (context_id)
    """).fetchall()[0]
    assert total == matching == docs_agree == sum(len(s.rows) for s in built.shards)


def test_duckdb_sees_activation_bytes_and_dictionary_strings(built):
    glob = str(built.root / "tasks" / "*" / "acts-*.parquet")
    rel = duckdb.sql(f"SELECT doc_id, octet_length(act_lo) AS lo FROM read_parquet('{glob}') LIMIT 3")
    assert [str(t) for t in rel.types] == ["VARCHAR", "BIGINT"]
    assert {lo for _, lo in rel.fetchall()} == {D}
    # the first row group of the first shard: its high-plane frame (any zstd decoder) and its low plane rows,
    # put together, are the stored bf16 bits
    rows = duckdb.sql(f"SELECT act_hi_zst, act_lo FROM read_parquet('{glob}', filename = true, file_row_number = true) "
                      f"WHERE filename LIKE '%task-00000-of-00002%acts-000000.parquet' AND file_row_number < {ROW_GROUP} "
                      f"ORDER BY file_row_number").fetchall()
    m = min(ROW_GROUP, len(built.shards[0].rows))
    assert len(rows) == m and all(r[0] is None for r in rows[1:])
    hi = np.frombuffer(zstandard.ZstdDecompressor().decompress(bytes(rows[0][0])), np.uint8).reshape(m, D)
    lo = np.stack([np.frombuffer(bytes(r[1]), np.uint8) for r in rows])
    expected = built.shards[0].rows.acts[:m].view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal((hi.astype(np.uint16) << 8) | lo, expected)

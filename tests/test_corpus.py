"""Corpus stream: file sources, bad records, damaged .zst files, partitioning, budget, quotas, resume, memory."""
from __future__ import annotations

import io
import json
import logging
import random
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard

from pipeline.config.schema import CorpusConfig
from pipeline.corpus import CorpusError, CorpusStream, Plan, TokenizedDoc, batch_tokenizer, make_plan
from pipeline.corpus.stream import WARN_FIRST


# --------------------------------------------------------------------------------------------- helpers

def word_tokenize(texts: list[str]) -> list[list[int]]:
    """Deterministic stand-in tokenizer: one id per whitespace word."""
    return [[zlib.crc32(w.encode()) % 1000 for w in t.split()] for t in texts]


def make_docs(n: int, seed: int = 0, subsets=("A", "B", "C"), max_words: int = 40) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(f"w{rng.randrange(500)}" for _ in range(rng.randint(1, max_words))),
             "meta": {"pile_set_name": rng.choice(subsets)}} for _ in range(n)]


def write(path: Path, lines: list, *, frames: int = 1, final_newline: bool = True) -> Path:
    """Write lines (dicts, str or bytes) as .jsonl, or as .jsonl.zst made of `frames` zstd frames."""
    raw = [ln if isinstance(ln, bytes) else (ln if isinstance(ln, str) else json.dumps(ln)).encode() for ln in lines]
    per = -(-len(raw) // frames)
    groups = [raw[i:i + per] for i in range(0, len(raw), per)]
    pieces = [b"\n".join(g) + b"\n" for g in groups]
    if not final_newline:
        pieces[-1] = pieces[-1][:-1]
    if path.name.endswith(".zst"):
        cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
        path.write_bytes(b"".join(cctx.compress(p) for p in pieces))
    else:
        path.write_bytes(b"".join(pieces))
    return path


def cfg(paths, **kw) -> CorpusConfig:
    return CorpusConfig(paths=[str(p) for p in paths], **kw)


def key(d: TokenizedDoc) -> tuple:
    return d.index, d.doc_id, d.subset, tuple(d.token_ids.tolist()), json.dumps(d.state_before, sort_keys=True)


def expected_tokens(docs: list[dict]) -> list[list[int]]:
    return word_tokenize([d["text"] for d in docs])


# ------------------------------------------------------------------------------------------- sources

def test_jsonl_and_zst_give_the_same_docs_with_line_based_ids(tmp_path):
    docs = make_docs(50)
    plain = write(tmp_path / "p.jsonl", docs)
    packed = write(tmp_path / "p.jsonl.zst", docs, frames=3, final_newline=False)
    out_plain = list(CorpusStream(cfg([plain], tokenize_batch=7), word_tokenize))
    out_packed = list(CorpusStream(cfg([packed], tokenize_batch=7), word_tokenize))
    assert [d.token_ids.tolist() for d in out_plain] == expected_tokens(docs)
    assert [d.token_ids.tolist() for d in out_packed] == expected_tokens(docs)  # unterminated last line kept
    assert [d.subset for d in out_packed] == [d["meta"]["pile_set_name"] for d in docs]
    assert [d.doc_id for d in out_plain] == [f"p.jsonl:{i + 1}" for i in range(50)]
    assert [d.doc_id for d in out_packed] == [f"p.jsonl.zst:{i + 1}" for i in range(50)]
    assert all(d.token_ids.dtype == np.int32 for d in out_packed)


def test_globs_are_sorted_and_paths_keep_their_order(tmp_path):
    write(tmp_path / "b.jsonl", [{"text": "bee"}])
    write(tmp_path / "a.jsonl", [{"text": "ay"}])
    globbed = [d.doc_id for d in CorpusStream(cfg([tmp_path / "*.jsonl"]), word_tokenize)]
    listed = [d.doc_id for d in CorpusStream(cfg([tmp_path / "b.jsonl", tmp_path / "a.jsonl"]), word_tokenize)]
    twice = [d.doc_id for d in CorpusStream(cfg([tmp_path / "a.jsonl", tmp_path / "*.jsonl"]), word_tokenize)]
    assert globbed == ["a.jsonl:1", "b.jsonl:1"]
    assert listed == ["b.jsonl:1", "a.jsonl:1"]
    assert twice == ["a.jsonl:1", "b.jsonl:1"]  # a file named twice is read once


def test_a_path_matching_nothing_is_a_one_line_error_naming_it(tmp_path):
    write(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(CorpusError, match=r"nothing\*\.jsonl") as err:
        CorpusStream(cfg([tmp_path / "a.jsonl", tmp_path / "nothing*.jsonl"]), word_tokenize)
    assert "\n" not in str(err.value)


def test_files_sharing_a_name_get_ids_relative_to_their_common_parent(tmp_path):
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    write(tmp_path / "d1" / "x.jsonl", [{"text": "one"}])
    write(tmp_path / "d2" / "x.jsonl", [{"text": "two"}])
    write(tmp_path / "y.jsonl", [{"text": "three"}])
    ids = [d.doc_id for d in CorpusStream(cfg([tmp_path / "d*" / "x.jsonl", tmp_path / "y.jsonl"]), word_tokenize)]
    assert ids == ["d1/x.jsonl:1", "d2/x.jsonl:1", "y.jsonl:1"]


def test_every_bad_record_reason_is_counted_and_every_good_record_kept(tmp_path, caplog):
    lines = [
        {"text": "good one", "meta": {"pile_set_name": "A"}},      # line 1
        '{"text": "broken',                                         # 2 invalid_json
        "[1, 2]",                                                   # 3 missing_text (not an object)
        {"meta": {"pile_set_name": "A"}},                           # 4 missing_text
        {"text": 5},                                                # 5 non_string_text
        {"text": None},                                             # 6 non_string_text
        b'{"text": "caf\xe9"}',                                     # 7 invalid_utf8 (latin-1 byte)
        '{"text": "lone \\ud800 surrogate"}',                        # 8 invalid_utf8
        {"text": "  \n\t "},                                        # 9 empty_text
        {"text": ""},                                               # 10 empty_text
        "",                                                         # 11 blank line: not a record
        "   ",                                                      # 12 blank line: not a record
        {"text": "good two", "meta": '{"pile_set_name": "B"}'},     # 13 meta as a JSON string
        {"text": "good three"},                                     # 14 no meta: subset unknown
    ]
    for suffix in (".jsonl", ".jsonl.zst"):
        path = write(tmp_path / f"bad{suffix}", lines, final_newline=False)
        stream = CorpusStream(cfg([path], tokenize_batch=2), word_tokenize)
        out = list(stream)
        assert [(d.doc_id, d.index, d.subset) for d in out] == [
            (f"bad{suffix}:1", 0, "A"), (f"bad{suffix}:13", 10, "B"), (f"bad{suffix}:14", 11, "unknown")]
        assert stream.skips == {"invalid_json": 1, "missing_text": 2, "non_string_text": 2,
                                "invalid_utf8": 2, "empty_text": 2}
        assert stream.stats["records_read"] == 12


def test_bad_record_warnings_are_capped_per_reason(tmp_path, caplog):
    path = write(tmp_path / "many.jsonl", ["not json"] * 200 + [{"text": "fine"}])
    with caplog.at_level(logging.WARNING, logger="pipeline.corpus"):
        stream = CorpusStream(cfg([path]), word_tokenize)
        assert len(list(stream)) == 1
    assert stream.skips == {"invalid_json": 200}
    assert len([r for r in caplog.records if "invalid_json" in r.getMessage()]) == WARN_FIRST


def _two_frame_zst(tmp_path, n=4000):
    docs = make_docs(n, seed=3, max_words=60)
    path = write(tmp_path / "damaged.jsonl.zst", docs, frames=2)
    first_frame = -(-n // 2)
    # Find where the second frame starts: the first frame alone decompresses to the first half's lines.
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    first_len = len(cctx.compress(b"\n".join(json.dumps(d).encode() for d in docs[:first_frame]) + b"\n"))
    return path, docs, first_frame, first_len


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_zst_errors_naming_the_file_after_all_earlier_good_records(tmp_path, damage):
    path, docs, first_frame, first_len = _two_frame_zst(tmp_path)
    data = bytearray(path.read_bytes())
    middle = first_len + (len(data) - first_len) // 2
    if damage == "truncate":
        del data[middle:]
    else:
        for k in range(64):
            data[middle + k] ^= 0x5A
    path.write_bytes(bytes(data))
    got = []
    with pytest.raises(CorpusError) as err:
        for d in CorpusStream(cfg([path], tokenize_batch=16), word_tokenize):
            got.append(d)
    message = str(err.value)
    assert str(path) in message and "line" in message and "\n" not in message
    # Every record of the intact first frame came through, in order, before the error.
    assert len(got) >= first_frame
    assert [d.token_ids.tolist() for d in got[:first_frame]] == expected_tokens(docs[:first_frame])


def test_damaged_zst_in_skip_mode_counts_it_and_goes_on(tmp_path):
    path, docs, first_frame, first_len = _two_frame_zst(tmp_path, n=400)
    path.write_bytes(path.read_bytes()[: first_len + 50])
    after = write(tmp_path / "after.jsonl", [{"text": "still here"}])
    stream = CorpusStream(cfg([path, after], on_corrupt_file="skip"), word_tokenize)
    out = list(stream)
    assert [d.token_ids.tolist() for d in out[:first_frame]] == expected_tokens(docs[:first_frame])
    assert out[-1].doc_id == "after.jsonl:1"
    assert stream.skips["corrupt_file"] == 1


# ---------------------------------------------------------------------------------------- partitions

def _mixed_corpus(tmp_path) -> list[Path]:
    """Three files with bad records sprinkled in, one damaged .zst (for skip mode) and one unterminated last line."""
    rng = random.Random(7)
    files = []
    for f in range(3):
        lines: list = []
        for d in make_docs(60, seed=f, subsets=("A", "B", "C", "D")):
            lines.append(d)
            if rng.random() < 0.15:
                lines.append(rng.choice(['{"text": 1}', "{oops", "", '{"text": " "}', b'{"text": "\xff"}']))
        files.append(write(tmp_path / f"part-{f}.jsonl.zst", lines, frames=2, final_newline=f != 0))
    damaged, _, _, first_len = _two_frame_zst(tmp_path, n=100)
    damaged.write_bytes(damaged.read_bytes()[: first_len + 40])
    return [files[0], damaged, files[1], files[2]]


MIXED = dict(token_budget=2500, subset_quotas={"A": 500, "*": 700}, on_corrupt_file="skip", tokenize_batch=5)


def task_docs(config: CorpusConfig, plan, task: int) -> tuple[list[tuple], dict, int]:
    """(docs, skips, records read) of one task: its units, each from the state the plan recorded."""
    docs, skips, records = [], {}, 0
    for unit in plan.task_units(task):
        stream = CorpusStream(config, word_tokenize, resume=unit.start, stop_at=unit.stop)
        before = stream.stats["records_read"]
        got = [(d.index, tuple(d.token_ids.tolist())) for d in stream]
        assert len(got) == unit.docs and sum(len(t) for _, t in got) == unit.tokens
        docs += got
        records += stream.stats["records_read"] - before
        for reason, n in stream.skips.items():
            skips[reason] = skips.get(reason, 0) + n
    return docs, skips, records


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 4, 7])
def test_plan_tasks_partition_the_single_stream(tmp_path, num_tasks):
    """Budget, quotas, bad records and a damaged file: the tasks' units together give exactly the single stream's
    selection, each task reads only its own records, every skip is counted once, context ids follow the stream."""
    paths = _mixed_corpus(tmp_path)
    config = cfg(paths, **MIXED)
    single = CorpusStream(config, word_tokenize)
    whole = [(d.index, tuple(d.token_ids.tolist())) for d in single]
    assert single.stats["tokens_selected"] == 2500
    plan = make_plan(config, word_tokenize, tokenizer="words", ctx_len=9, num_tasks=num_tasks)
    assert len(plan.tasks) == num_tasks and sorted(i for t in plan.tasks for i in t) == list(range(len(plan.units)))
    got, skip_sum, records = [], {}, 0
    for task in range(num_tasks):
        docs, skips, read = task_docs(config, plan, task)
        got += docs
        records += read
        for reason, n in skips.items():
            skip_sum[reason] = skip_sum.get(reason, 0) + n
    assert got == whole
    assert skip_sum == single.skips and single.skips["corrupt_file"] == 1
    assert records == single.stats["records_read"]  # no record read twice, none skipped over unread
    ids = 0
    for unit in plan.units:  # context ids: the contexts of every selected doc before the unit, whoever holds it
        assert unit.first_context_id == ids
        ids += unit.contexts
    assert plan.totals["contexts"] == ids == sum(-(-len(t) // 8) for _, t in whole)


def test_plan_balances_tasks_and_cuts_at_files_and_token_counts(tmp_path):
    docs = make_docs(400, seed=3, max_words=30)
    paths = [write(tmp_path / f"f{i}.jsonl.zst", docs[i * 50 : (i + 1) * 50]) for i in range(8)]
    config = cfg(paths, token_budget=4000)
    plan = make_plan(config, word_tokenize, tokenizer="words", ctx_len=9, num_tasks=4)
    assert {u.source_part for u in plan.units} == set(range(len({u.source_part for u in plan.units})))
    assert all(plan.units[i].source_part <= plan.units[i + 1].source_part for i in range(len(plan.units) - 1))
    shares = [plan.task_tokens(t) for t in range(4)]
    assert sum(shares) == 4000 and max(shares) <= 1.6 * min(shares), shares
    # each task's units are one contiguous run, so that it reads sequentially
    for units in plan.tasks:
        assert units == list(range(units[0], units[-1] + 1))
    # a JSON round trip (plan.json) gives the same plan
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.digest() == plan.digest() and task_docs(config, again, 2) == task_docs(config, plan, 2)


def test_an_empty_selection_is_an_error(tmp_path):
    path = write(tmp_path / "a.jsonl", make_docs(5))
    with pytest.raises(CorpusError, match="selection is empty"):
        make_plan(cfg([path], subset_quotas={"*": 0}), word_tokenize, tokenizer="words", ctx_len=9, num_tasks=2)


# ----------------------------------------------------------------------------------- budget, quotas

def test_budget_truncates_the_crossing_doc_exactly_and_stops_reading(tmp_path):
    docs = make_docs(100, seed=1)
    full = expected_tokens(docs)
    cut = 20
    budget = sum(len(t) for t in full[:cut]) + 1
    lines = docs[:cut + 1] + ["{bad json"] + docs[cut + 1:]
    path = write(tmp_path / "b.jsonl", lines)
    seen_texts = []

    def spy(texts):
        seen_texts.extend(texts)
        return word_tokenize(texts)

    stream = CorpusStream(cfg([path], token_budget=budget, tokenize_batch=8), spy)
    out = list(stream)
    assert len(out) == cut + 1
    assert out[-1].token_ids.tolist() == full[cut][:1]
    assert [d.token_ids.tolist() for d in out[:cut]] == full[:cut]
    assert stream.stats["tokens_selected"] == budget and stream.stats["truncated_docs"] == 1
    assert stream.skips == {}  # the bad line right after the budget end was never reached
    assert stream.stats["records_read"] == cut + 1
    assert len(seen_texts) <= cut + 1 + 8  # at most one batch past the end
    assert list(CorpusStream(cfg([path], token_budget=budget), word_tokenize, resume=stream.state())) == []


def test_subset_quotas_cap_listed_and_star_subsets(tmp_path):
    docs = make_docs(300, seed=2, subsets=("A", "B", "C"))
    path = write(tmp_path / "q.jsonl", docs)
    stream = CorpusStream(cfg([path], subset_quotas={"A": 100, "*": 60}, tokenize_batch=16), word_tokenize)
    out = list(stream)
    by_subset = stream.stats["tokens_by_subset"]
    assert by_subset == {"A": 100, "B": 60, "C": 60}
    assert sum(len(d.token_ids) for d in out) == 220
    # The doc that crosses a quota is a prefix of its full tokens; later docs of that subset are excluded.
    used, expected = {}, []
    for i, (doc, tokens) in enumerate(zip(docs, expected_tokens(docs))):
        subset = doc["meta"]["pile_set_name"]
        room = {"A": 100}.get(subset, 60) - used.get(subset, 0)
        if room > 0:
            expected.append((i, tokens[:room]))
            used[subset] = used.get(subset, 0) + len(tokens[:room])
    assert [(d.index, d.token_ids.tolist()) for d in out] == expected
    assert stream.stats["quota_excluded_docs"] == 300 - len(out)
    assert 1 <= stream.stats["truncated_docs"] <= 3


def test_subsets_without_a_quota_or_star_are_uncapped(tmp_path):
    docs = make_docs(80, seed=4, subsets=("A", "B"))
    path = write(tmp_path / "q.jsonl", docs)
    stream = CorpusStream(cfg([path], subset_quotas={"A": 0}), word_tokenize)
    out = list(stream)
    b_tokens = [t for d, t in zip(docs, expected_tokens(docs)) if d["meta"]["pile_set_name"] == "B"]
    assert [d.token_ids.tolist() for d in out] == b_tokens
    assert stream.stats["tokens_by_subset"] == {"B": sum(len(t) for t in b_tokens)}


def test_docs_that_tokenize_to_nothing_are_not_yielded(tmp_path):
    path = write(tmp_path / "e.jsonl", [{"text": "EMPTY here"}, {"text": "kept"}, {"text": "EMPTY too"}])

    def tokenize(texts):
        return [[] if t.startswith("EMPTY") else [1, 2] for t in texts]

    stream = CorpusStream(cfg([path]), tokenize)
    assert [d.doc_id for d in stream] == ["e.jsonl:2"]
    assert stream.stats["empty_token_docs"] == 2 and stream.skips == {}


def test_tokenizer_is_called_in_batches(tmp_path):
    path = write(tmp_path / "t.jsonl", make_docs(50))
    sizes = []

    def spy(texts):
        sizes.append(len(texts))
        return word_tokenize(texts)

    assert len(list(CorpusStream(cfg([path], tokenize_batch=16), spy))) == 50
    assert sizes == [16, 16, 16, 2]


def test_real_fast_tokenizer_batch_path_matches_single_encodes(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = [{"text": f"The {w} jumped over the lazy dog number {i}. Tokenizers merge bytes!", "meta": {}}
            for i, w in enumerate(["quick", "slow", "brown", "café", "naïve"] * 8)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([d["text"] for d in docs], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<bos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>")
    path = write(tmp_path / "r.jsonl.zst", docs)
    for tok in (fast, bpe):
        out = list(CorpusStream(cfg([path], tokenize_batch=6), batch_tokenizer(tok)))
        assert [d.token_ids.tolist() for d in out] == [bpe.encode(d["text"], add_special_tokens=False).ids
                                                      for d in docs]
        assert all(0 not in d.token_ids for d in out)  # no BOS (<bos> is id 0)


# -------------------------------------------------------------------------------------------- resume

def test_resume_from_state_before_gives_the_identical_rest(tmp_path):
    paths = _mixed_corpus(tmp_path)
    config = cfg(paths, **MIXED)
    stream = CorpusStream(config, word_tokenize)
    full = list(stream)
    end_skips, end_stats, end_state = stream.skips, stream.stats, stream.state()
    assert len(full) > 20
    file_starts = [i for i in range(1, len(full)) if full[i].doc_id.split(":")[0] != full[i - 1].doc_id.split(":")[0]]
    for at in sorted({0, 1, 7, len(full) // 2, len(full) - 1, *file_starts}):
        state = json.loads(json.dumps(full[at].state_before))  # states survive a JSON round trip
        resumed = CorpusStream(config, word_tokenize, resume=state)
        rest = list(resumed)
        assert [key(d) for d in rest] == [key(d) for d in full[at:]], at
        assert resumed.skips == end_skips and resumed.stats == end_stats and resumed.state() == end_state


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_resume_deep_inside_a_file_spanning_many_read_chunks(tmp_path, suffix):
    docs = make_docs(3000, seed=6, max_words=60)  # about 0.6 MB: many 64 KiB read chunks
    lines: list = []
    for i, d in enumerate(docs):
        lines += [d, ""] if i % 7 == 0 else [d]  # blank lines shift line numbers away from record indices
    path = write(tmp_path / f"long{suffix}", lines, frames=3, final_newline=False)
    full = list(CorpusStream(cfg([path], tokenize_batch=64), word_tokenize))
    for at in (1000, 2222, 2999):
        rest = list(CorpusStream(cfg([path]), word_tokenize, resume=full[at].state_before))
        assert [key(d) for d in rest] == [key(d) for d in full[at:]]


def test_resume_from_state_mid_iteration_and_after_the_end(tmp_path):
    docs = make_docs(40)
    paths = [write(tmp_path / "a.jsonl", docs[:20], final_newline=False), write(tmp_path / "b.jsonl", docs[20:])]
    stream = CorpusStream(cfg(paths, tokenize_batch=7), word_tokenize)
    head = []
    for d in stream:
        head.append(d)
        if len(head) == 20:  # the last record of a file whose last line has no newline
            break
    rest = list(CorpusStream(cfg(paths), word_tokenize, resume=stream.state()))
    assert [d.token_ids.tolist() for d in head + rest] == expected_tokens(docs)
    # Iterating the same stream again also continues after the last yielded doc.
    assert [d.index for d in stream] == list(range(20, 40))
    assert list(CorpusStream(cfg(paths), word_tokenize, resume=stream.state())) == []


def test_resume_state_for_another_corpus_is_refused(tmp_path):
    a = write(tmp_path / "a.jsonl", make_docs(5))
    b = write(tmp_path / "b.jsonl", make_docs(6))
    state = next(iter(CorpusStream(cfg([a]), word_tokenize))).state_before
    with pytest.raises(CorpusError, match="different"):
        CorpusStream(cfg([b]), word_tokenize, resume=state)


def test_doc_ids_are_stable_and_unique_across_runs(tmp_path):
    paths = _mixed_corpus(tmp_path)
    runs = [[d.doc_id for d in CorpusStream(cfg(paths, on_corrupt_file="skip"), word_tokenize)] for _ in range(2)]
    assert runs[0] == runs[1] and len(set(runs[0])) == len(runs[0])


# -------------------------------------------------------------------------------------------- memory

@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_memory_stays_constant_on_a_large_file(tmp_path, suffix):
    line = json.dumps({"text": "lorem ipsum dolor " * 2000, "meta": {"pile_set_name": "Big"}}).encode()
    n = 40_000_000 // len(line)  # about 40 MB of text
    path = tmp_path / f"big{suffix}"
    data = b"\n".join([line] * n) + b"\n"
    if suffix.endswith(".zst"):
        data = zstandard.ZstdCompressor(level=1).compress(data)
    path.write_bytes(data)
    del data

    def tokenize(texts):
        return [[len(t)] for t in texts]

    tracemalloc.start()
    try:
        stream = iter(CorpusStream(cfg([path], tokenize_batch=8), tokenize))
        first = next(stream)
        _, peak_first = tracemalloc.get_traced_memory()
        count = 1 + sum(1 for _ in stream)
        _, peak_all = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.doc_id == f"big{suffix}:1" and count == n
    assert peak_first < 4_000_000  # the first doc came without reading the 40 MB file
    assert peak_all < 8_000_000


# ------------------------------------------------------------------------------------ reader internals

def test_line_splitter_skips_and_splits_across_any_chunking():
    from pipeline.corpus.records import _lines

    rng = random.Random(5)
    for final_newline in (True, False):
        lines = [b"x" * rng.randrange(0, 30) for _ in range(200)]
        data = b"\n".join(lines) + (b"\n" if final_newline else b"")
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(data)), 15))
            chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
            skip = rng.randrange(0, 201)
            assert list(_lines(iter(chunks), skip)) == lines[skip:]
    with pytest.raises(CorpusError, match="past the end"):
        list(_lines(iter([b"a\nb\n"]), 3))


def test_zstd_frame_walker_finds_truncation_anywhere_but_on_frame_ends():
    from pipeline.corpus.records import _Damaged, _chunks

    data = b"".join(b"line %d\n" % i for i in range(20000)) + b"\0" * 300_000 + random.Random(1).randbytes(200_000)
    one_shot = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)  # has a content size
    streamed = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    streamed = streamed.compress(data) + streamed.flush()
    skippable = (0x184D2A51).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    full = one_shot + skippable + streamed
    ends = {len(one_shot), len(one_shot) + len(skippable), len(full)}
    assert b"".join(_chunks(io.BytesIO(full), True)) == data + data
    for cut in [1, 5, 100, len(one_shot) - 4, len(one_shot) - 1, *ends, len(one_shot) + 6, len(full) - 1,
                *random.Random(2).sample(range(len(full)), 25)]:
        try:
            b"".join(_chunks(io.BytesIO(full[:cut]), True))
            complete = True
        except _Damaged:
            complete = False
        assert complete == (cut in ends), cut


def test_records_before_damage_are_yielded_even_inside_an_unfinished_batch(tmp_path):
    """The damage is found while a tokenizer batch is still filling: those earlier records must not be lost."""
    import zstandard

    from pipeline.config import CorpusConfig
    from pipeline.corpus import CorpusError, CorpusStream

    # Enough text for several 128 KiB zstd blocks: only whole blocks before the cut can be decoded.
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "sparse", "feature", "token", "layer"]
    docs = [json.dumps({"text": f"record {i} " + " ".join(rng.choice(words, 40))}) for i in range(3000)]
    blob = zstandard.ZstdCompressor(level=1).compress(("\n".join(docs) + "\n").encode())
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    stream = CorpusStream(CorpusConfig(paths=[str(path)], tokenize_batch=1000), lambda texts: [t.split() and [1] * len(t.split()) for t in texts])
    seen = []
    with pytest.raises(CorpusError, match="cut.jsonl.zst"):
        for doc in stream:
            seen.append(doc.doc_id)
    assert len(seen) > 100
    assert seen == [f"cut.jsonl.zst:{i}" for i in range(1, len(seen) + 1)]

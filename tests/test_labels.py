"""Labelling without an endpoint: answer parsing, detection/fuzzing scores from known answer sets, the balance and
order of what a scorer is shown, the excerpts' text, and the label cache's key."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.labels import prompts
from pipeline.analysis.labels.cache import LabelCache, cache_key
from pipeline.analysis.labels.examples import CLOSE, OPEN, Excerpt, marked_text, trim
from pipeline.analysis.labels.output import overall
from pipeline.analysis.labels.scoring import Tally, batches, detection_items, fuzzing_items
from pipeline.config import validate
from pipeline.config.label import LabelRunConfig
from pipeline.errors import ConfigError


def excerpt(i: int, active: list[int], n: int = 12, source: str = "interval") -> Excerpt:
    acts = [0.0] * n
    for a in active:
        acts[a] = 1.5
    return Excerpt(tuple(range(100 + i, 100 + i + n)), tuple(acts), row=i, source=source)


# ---- answers ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer,n,expected", [
    ("[1, 0, 1]", 3, [1, 0, 1]),
    ("Sure: [0,0,1] is my answer", 3, [0, 0, 1]),
    ("['yes', 'no']", 2, [1, 0]),
    ("[true, false, true]", 3, [1, 0, 1]),
    ("1", 1, [1]),
    ("No.", 1, [0]),
    ("[1, 2, 3, 4, 5]", 5, None),       # not 0/1: what SmolLM2 says when asked about 5 excerpts at once
    ("[1, 0]", 3, None),                # wrong length
    ("1 0 1", 3, None),                 # no list
    ("", 2, None),
    (None, 1, None),
    ("The name Moses is a biblical figure", 1, None),
])
def test_scorer_answers_parse_or_count_as_malformed(answer, n, expected):
    assert prompts.parse_answers(answer, n) == expected


@pytest.mark.parametrize("answer,expected", [
    ("Explanation: the name Moses", ("the name Moses", "ok")),
    ("Sure!\nExplanation: \"small numbers written as words\".", ("small numbers written as words", "ok")),
    ("Explanation: POLYSEMANTIC", ("POLYSEMANTIC", "polysemantic")),
    ("explanation: polysemantic.", ("POLYSEMANTIC", "polysemantic")),
    ("   ", ("", "empty")),
    (None, ("", "empty")),
    ("Explanation:", ("", "empty")),
    ("code keywords\nand more", ("code keywords", "ok")),
])
def test_explanations_parse_with_polysemantic_and_empty_recorded_as_such(answer, expected):
    assert prompts.parse_explanation(answer) == expected


# ---- scores from known answer sets ------------------------------------------------------------------------------

def test_scores_from_a_known_answer_set():
    t = Tally()
    t.add([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])   # tp 2, fn 1, tn 1, fp 1
    t.add([0, 1], None)                       # malformed: counts in neither
    t.add([0, 0, 1], [0, 0, 1])               # tp 1, tn 2
    m = t.metrics()
    assert (t.tp, t.fp, t.tn, t.fn) == (3, 1, 3, 1)
    assert m["n"] == 8 and m["malformed"] == 1 and m["answers"] == 3
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_scores_of_a_scorer_that_always_says_yes_and_of_one_never_answering():
    yes = Tally()
    yes.add([1, 0, 1, 0], [1, 1, 1, 1])
    m = yes.metrics()
    assert m["accuracy"] == 0.5 and m["recall"] == 1.0 and m["precision"] == 0.5 and m["f1"] == pytest.approx(2 / 3)
    never = Tally()
    never.add([1, 0], None)
    assert never.metrics()["accuracy"] is None and never.metrics()["f1"] is None and never.metrics()["malformed"] == 1
    no = Tally()
    no.add([0, 0], [0, 0])
    assert no.metrics()["accuracy"] == 1.0 and no.metrics()["f1"] is None  # no positives: F1 undefined


def test_overall_pools_the_counts_and_averages_per_feature():
    def rec(f, det, fuz, status="ok"):
        r = {"feature": f, "status": status, "answers": [], "detection": None, "fuzzing": None}
        for name, (truth, said) in (("detection", det), ("fuzzing", fuz)):
            if truth is None:
                continue
            t = Tally()
            t.add(truth, said)
            r[name] = t.metrics() | {"tp": t.tp, "fp": t.fp, "tn": t.tn, "fn": t.fn}
            r["answers"].append({"scorer": name, "truth": truth, "said": said, "raw": str(said)})
        return r

    records = [rec(0, ([1, 0], [1, 0]), ([1, 0], [1, 1])), rec(1, ([1, 0, 1, 0], [0, 0, 0, 0]), ([1, 0], None)),
               rec(2, (None, None), (None, None), status="polysemantic")]
    o = overall(records)
    assert o["detection"]["accuracy"] == pytest.approx(4 / 6)            # pooled: 2 + 2 right of 6
    assert o["detection"]["mean_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert o["fuzzing"]["n"] == 2 and o["fuzzing"]["malformed"] == 1 and o["fuzzing"]["features_scored"] == 1
    assert o["statuses"] == {"ok": 2, "polysemantic": 1} and o["malformed_answers"] == 1 and o["answers"] == 4


# ---- what the scorers see ---------------------------------------------------------------------------------------

def test_detection_is_balanced_and_its_order_independent_of_which_activate():
    pos = [excerpt(i, [5]) for i in range(10)]
    neg = [excerpt(100 + i, []) for i in range(14)]
    items = detection_items(pos, neg, np.random.default_rng(0))
    assert len(items) == 20 and sum(it.truth for it in items) == 10
    assert all(it.marks is None for it in items)  # nothing marked: the text is all a detector sees
    # over many draws, every slot holds an activating excerpt about half the time, and the first ten are not the
    # activating ones more often than chance (the positives were passed first)
    share = np.zeros(20)
    for seed in range(2000):
        share += [it.truth for it in detection_items(pos, neg, np.random.default_rng(seed))]
    share /= 2000
    assert np.all(np.abs(share - 0.5) < 0.06), share
    # the same seed gives the same order (a rerun asks the same questions)
    again = detection_items(pos, neg, np.random.default_rng(0))
    assert [it.excerpt.row for it in again] == [it.excerpt.row for it in items]


def test_detection_prompts_show_no_marks_and_no_labels(tokenizer):
    pos = [excerpt(i, [3, 4]) for i in range(4)]
    neg = [excerpt(50 + i, []) for i in range(4)]
    items = detection_items(pos, neg, np.random.default_rng(1))
    for batch in batches(items, 3):
        texts = [marked_text(tokenizer, it.excerpt.token_ids, it.marks) for it in batch]
        user = prompts.detection_messages("some explanation", texts)[-1]["content"]
        assert OPEN not in user and CLOSE not in user
        for word in ("activat", "positive", "negative", "truth"):
            assert word not in user.lower()


def test_fuzzing_marks_half_right_and_half_wrong_with_as_many_marks():
    pos = [excerpt(i, [2, 3] if i % 2 else [7]) for i in range(10)]
    items = fuzzing_items(pos, np.random.default_rng(3))
    assert len(items) == 10 and sum(it.truth for it in items) == 5
    for it in items:
        marks, active = np.asarray(it.marks), it.excerpt.active
        if it.truth:
            assert np.array_equal(marks, active)
        else:
            assert marks.sum() == active.sum() and not (marks & active).any()
    share = np.zeros(10)
    for seed in range(2000):
        share += [it.truth for it in fuzzing_items(pos, np.random.default_rng(seed))]
    assert np.all(np.abs(share / 2000 - 0.5) < 0.06)


def test_fuzzing_leaves_out_an_excerpt_that_cannot_be_marked_wrongly():
    full = Excerpt((1, 2, 3), (1.0, 1.0, 1.0), row=0, source="top")
    items = fuzzing_items([full, excerpt(1, [2]), excerpt(2, [2]), excerpt(3, [2])], np.random.default_rng(0))
    assert sum(it.truth for it in items) == len(items) - sum(it.truth for it in items)
    assert all(it.excerpt.row != 0 for it in items if it.truth == 0)


# ---- excerpt text -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pipeline.analysis.labels.local_server import model_dir

    return AutoTokenizer.from_pretrained(model_dir("smollm2"))


def test_marked_text_wraps_runs_of_marked_tokens_and_keeps_the_text(tokenizer):
    text = "The river Thames flows through London.\nIt is long."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    marks = np.zeros(len(ids), bool)
    thames = [i for i, t in enumerate(ids) if "Th" in tokenizer.decode([t]) or "ames" in tokenizer.decode([t])]
    marks[thames] = True
    out = marked_text(tokenizer, ids, marks)
    assert OPEN + "Thames" + CLOSE in out
    assert out.replace(OPEN, "").replace(CLOSE, "") == text.replace("\n", "↵")
    assert marked_text(tokenizer, ids, None) == text.replace("\n", "↵")


def test_trim_keeps_the_centre_inside_and_the_length_fixed():
    ids, acts = list(range(33)), [0.0] * 33
    acts[16] = 2.0
    t_ids, t_acts = trim(ids, acts, 16, 24)
    assert len(t_ids) == 24 and t_acts[t_ids.index(16)] == 2.0
    t_ids, _ = trim(ids, acts, 1, 24)
    assert t_ids == list(range(24))
    t_ids, _ = trim(ids[:10], acts[:10], 5, 24)
    assert t_ids == list(range(10))


# ---- config and cache -------------------------------------------------------------------------------------------

def test_config_names_the_bad_key_in_one_line():
    with pytest.raises(ConfigError, match="ids: select: ids needs"):
        validate(LabelRunConfig, {"run": "r", "select": "ids"}, "label.yaml")
    with pytest.raises(ConfigError, match="endpoint.concurency: unknown key"):
        validate(LabelRunConfig, {"run": "r", "endpoint": {"concurency": 2}}, "label.yaml")


def test_the_cache_key_changes_with_what_changes_the_answers(tmp_path):
    cfg = validate(LabelRunConfig, {"run": "r"})
    base = LabelCache(tmp_path, cache_key(b"{}", "m", cfg, 1)).dir
    assert LabelCache(tmp_path, cache_key(b"{}", "m", cfg, 1)).dir == base
    assert LabelCache(tmp_path, cache_key(b"{}", "other-model", cfg, 1)).dir != base
    assert LabelCache(tmp_path, cache_key(b'{"a": 1}', "m", cfg, 1)).dir != base
    assert LabelCache(tmp_path, cache_key(b"{}", "m", cfg.model_copy(update={"seed": 1}), 1)).dir != base
    assert LabelCache(tmp_path, cache_key(b"{}", "m", cfg, 2)).dir != base
    faster = cfg.model_copy(update={"endpoint": cfg.endpoint.model_copy(update={"concurrency": 16})})
    assert LabelCache(tmp_path, cache_key(b"{}", "m", faster, 1)).dir == base


def test_a_damaged_cache_file_is_labelled_again(tmp_path):
    cache = LabelCache(tmp_path, {"k": 1})
    cache.put({"feature": 7, "explanation": "x"})
    assert cache.get(7)["explanation"] == "x"
    cache.path(7).write_text('{"feature": 7, "expl')
    assert cache.get(7) is None


def test_selection_takes_the_most_selective_features_that_fire_often_enough():
    import pyarrow as pa

    from pipeline.analysis.labels.run import select_features

    table = pa.table({"count": [0, 50, 5, 40, 100], "selectivity": [0.0, 0.3, 0.9, 0.5, 0.1]})
    cfg = validate(LabelRunConfig, {"run": "r", "n": 2, "min_count": 20})
    assert select_features(table, cfg) == ([3, 1], [])
    assert select_features(table, cfg.model_copy(update={"select": "all"})) == ([1, 3, 4], [])
    ids = validate(LabelRunConfig, {"run": "r", "select": "ids", "ids": [4, 2, 4, 0], "min_count": 20})
    assert select_features(table, ids) == ([4], [2, 0])  # rare and dead ones are skipped, and reported
    with pytest.raises(ConfigError, match=r"ids: \[7\] out of range; the SAE has features 0..4"):
        select_features(table, ids.model_copy(update={"ids": [1, 7]}))


def test_the_cli_fails_in_one_line_on_a_missing_analysis(tmp_path, capsys):
    from pipeline.cli.main import main

    assert main(["label", str(tmp_path), "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saepipe label: error:") and "expected an analysis dir" in err and "\n" not in err
    assert main(["label", str(tmp_path), "--ids", "3,x"]) == 2
    assert "--ids: '3,x' is not a list of feature ids" in capsys.readouterr().err

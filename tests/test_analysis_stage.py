"""The analysis stage as the pipeline and the demo run it: statistics, spliced evaluation and browser in one go,
each part skipped on a rerun once its output is on disk; and what the demo prints from it."""
from __future__ import annotations

import json

import pytest

from pipeline.analysis.demo_summary import print_features, showcase_features, steering_example
from pipeline.analysis.stage import analysis_complete, run_analysis_stage
from pipeline.config import validate
from pipeline.config.analysis import AnalysisRunConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def staged(smollm2_sae, smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage") / "analysis"
    cfg = validate(AnalysisRunConfig, {"run": str(smollm2_sae.run_dir), "out": str(out), "tokens": 4096,
                                       "top_k": 8, "eval_contexts": 4, "batch_size": 1024}, "test")
    return cfg, run_analysis_stage(cfg, model=smollm2, show_progress=False)


def test_the_stage_runs_its_three_parts_and_a_rerun_redoes_none(staged, smollm2):
    cfg, first = staged
    assert first.status == "completed" and first.done_before == [] and analysis_complete(cfg)
    assert first.browser.is_file() and (first.analysis_dir / "features.parquet").is_file()
    assert json.loads((first.analysis_dir / "spliced.json").read_text())["ce_loss_score"] == first.spliced["ce_loss_score"]
    stamp = (first.analysis_dir / "features.parquet").stat().st_mtime_ns
    again = run_analysis_stage(cfg, model=smollm2, show_progress=False)
    assert again.done_before == ["analyze", "spliced_eval", "browser"]
    assert (first.analysis_dir / "features.parquet").stat().st_mtime_ns == stamp


def test_a_stop_between_parts_leaves_the_rest_for_the_next_run(staged, smollm2, tmp_path):
    cfg, _ = staged
    fresh = cfg.model_copy(update={"out": str(tmp_path / "a"), "browser": False})

    class StopAfterFirst:
        def should_stop(self) -> bool:
            return True

    outcome = run_analysis_stage(fresh, stop=StopAfterFirst(), model=smollm2, show_progress=False)
    assert outcome.status == "stopped" and (tmp_path / "a" / "analysis.json").is_file()
    assert not (tmp_path / "a" / "spliced.json").exists() and not analysis_complete(fresh)


def test_the_demo_summary_shows_features_with_their_marked_contexts_and_steers_one(staged, smollm2_sae, smollm2,
                                                                                   capsys):
    cfg, outcome = staged
    shown = print_features(outcome.analysis_dir, count=3)
    out = capsys.readouterr().out
    assert shown == showcase_features(outcome.analysis_dir, 3) and len(shown) == 3
    for f in shown:
        assert f"feature {f}:" in out
    assert out.count("«") >= 3 and out.count("«") == out.count("»")
    result = steering_example(outcome.analysis_dir, str(smollm2_sae.run_dir), smollm2)
    assert result["baseline"] and result["steered"] and result["steered"] != result["baseline"]

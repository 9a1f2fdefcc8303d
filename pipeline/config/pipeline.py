"""What `saepipe submit pipeline` reads: a run directory and the configs of the stages it chains. A stage is a path to
its own YAML, the config inline, or both: a mapping with `from: PATH` whose other keys are merged over that file's.
The training store is the extraction's: `train.data.root` is set from `extract.store.root`. The analysis stage
(optional: absent means its defaults, `analyze: false` leaves it out) analyses the trained run: `analyze.run` is set
from `train.run_dir`. The labelling stage (optional: absent or `label: false` leaves it out, since it needs an LLM
endpoint) labels that analysis: `label.run` and `label.analysis` are set from the stages before it."""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError

from .analysis import AnalysisRunConfig
from .label import LabelRunConfig
from .load import apply_override, read_mapping, validate
from .schema import ExtractRunConfig
from .train import TrainRunConfig

STAGES = ("extract", "train")
OPTIONAL_STAGES = ("analyze", "label")


def load_pipeline_config(path: str | Path, overrides: list[str] = ()) -> tuple[str, dict]:
    """(run_dir, {stage: validated config}) with extract, train, (unless `analyze: false`) analyze and (when given)
    label. Overrides
    address a stage, e.g. `train.sae.k=64`; stage files are found relative to the pipeline file's directory, or to the
    working directory."""
    path = Path(path)
    data = read_mapping(path)
    unknown = sorted(set(data) - {"run_dir", *STAGES, *OPTIONAL_STAGES})
    if unknown or "run_dir" not in data or any(s not in data for s in STAGES):
        raise ConfigError(f"{path}: a pipeline config has run_dir, extract and train (each stage a path or a "
                          f"mapping){'; unknown key ' + ', '.join(unknown) if unknown else ''}")
    data.setdefault("analyze", {})
    data.setdefault("label", False)
    for stage in (*STAGES, *OPTIONAL_STAGES):
        spec = data[stage]
        if isinstance(spec, str):
            data[stage] = _load_stage_file(spec, path)
        elif isinstance(spec, dict) and "from" in spec:
            data[stage] = _merged(_load_stage_file(spec["from"], path), {k: v for k, v in spec.items() if k != "from"})
    for assignment in overrides:
        apply_override(data, assignment)
    extract = validate(ExtractRunConfig, data["extract"], f"{path}: extract")
    train_data = dict(data["train"])
    train_data["data"] = {**train_data.get("data", {}), "root": extract.store.root}
    train = validate(TrainRunConfig, train_data, f"{path}: train")
    configs = {"extract": extract, "train": train}
    if data["analyze"] is not False:
        if not isinstance(data["analyze"], dict):
            raise ConfigError(f"{path}: analyze: a mapping (or a path to one), or false to leave the stage out")
        configs["analyze"] = validate(AnalysisRunConfig, {**data["analyze"], "run": train.run_dir}, f"{path}: analyze")
    if data["label"] is not False:
        if not isinstance(data["label"], dict):
            raise ConfigError(f"{path}: label: a mapping (or a path to one), or false to leave the stage out")
        if "analyze" not in configs:
            raise ConfigError(f"{path}: label: labels the analysis, so the pipeline needs its analyze stage")
        configs["label"] = validate(LabelRunConfig, {**data["label"], "run": train.run_dir,
                                                     "analysis": configs["analyze"].out}, f"{path}: label")
    return str(data["run_dir"]), configs


def _load_stage_file(name: str, pipeline_file: Path) -> dict:
    for candidate in (pipeline_file.parent / name, Path(name)):
        if candidate.is_file():
            return read_mapping(candidate)
    raise ConfigError(f"{pipeline_file}: stage config {name!r} not found (relative to {pipeline_file.parent} or the "
                      "working directory)")


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out

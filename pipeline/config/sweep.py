"""What `saepipe sweep` reads: a base training run and the grid of seed 002 around it (expansion factor × λ ×
resampling on/off), where the cells run (local processes or a Slurm array) and what each cell runs after training.

`base` is a training config: a path to its YAML (relative to the sweep file's directory or the working directory),
the config inline, or a mapping with `from: PATH` whose other keys are merged over that file's. Its `run_dir` is not
used: every cell trains in SWEEP_DIR/cells/<cell name>."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.errors import ConfigError

from .cluster import SlurmConfig
from .load import apply_override, read_mapping, validate
from .pipeline import _load_stage_file, _merged
from .sae import ResampleConfig
from .strict import Strict
from .train import TrainRunConfig

RELU_ARCHS = ("relu_2023", "relu_2024")
CELLS_DIR = "cells"
# What a cell does after training, and the module each step needs (written by other parts of the analysis stage).
STEP_MODULES = {"spliced_eval": "pipeline.analysis.spliced_eval", "analysis": "pipeline.analysis.analyze"}


class SweepGrid(Strict):
    """The axes; every combination is one cell (expansion-major, then λ, then resampling)."""

    expansion_factors: list[int] = Field(min_length=1, description=(
        "dictionary sizes as multiples of the input width: d_sae = factor × sae.d_in (seed 002: 4, 8, 16, 32)"))
    l1_coefficients: list[float] | None = Field(default=None, min_length=1, description=(
        "λ values (sae.l1_coefficient, the ReLU recipes' L1 penalty, in this project's loss units); unset: the "
        "base's λ only"))
    resampling: list[bool] = Field(default_factory=lambda: [True, False], min_length=1, description=(
        "dead-latent resampling on and/or off (on needs the relu_2023 recipe)"))

    @field_validator("expansion_factors")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(f <= 0 for f in v):
            raise ValueError(f"expansion factors must be positive, got {v}")
        return v

    @field_validator("l1_coefficients")
    @classmethod
    def _non_negative(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(x < 0 for x in v):
            raise ValueError(f"λ values must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> "SweepGrid":
        for name in ("expansion_factors", "l1_coefficients", "resampling"):
            values = getattr(self, name)
            if values is not None and len(set(values)) != len(values):
                raise ValueError(f"grid.{name}: repeated value in {values}")
        return self


class SweepStages(Strict):
    """What every cell runs after training and its held-out evaluation (the trainer's final eval)."""

    spliced_eval: bool = Field(default=True, description=(
        "CE loss and KL with the SAE spliced into the model (ce_loss_score, kl_div_score; loads the model)"))
    spliced_contexts: int = Field(default=64, gt=0, description="held-out contexts of the spliced evaluation")
    analysis: bool = Field(default=True, description="`saepipe analyze` of the cell's SAE (features.parquet, examples)")
    analysis_tokens: int | None = Field(default=None, gt=0, description=(
        "tokens the analysis reads; unset: every held-out row"))
    device: str = Field(default="auto", description="device of the spliced evaluation and the analysis")


class SweepConfig(Strict):
    """What `saepipe sweep` reads."""

    sweep_dir: str = Field(description="cells (one training run each), the record of the jobs, the results table and plots")
    base: TrainRunConfig = Field(description="the training run every cell starts from (a path, inline, or `from:`)")
    grid: SweepGrid = Field(description="the axes of the grid")
    resample: ResampleConfig | None = Field(default=None, description=(
        "resampling settings of the cells with resampling on; unset: the base's sae.resample, else the defaults"))
    stages: SweepStages = Field(default_factory=SweepStages, description="what each cell runs after training")
    executor: Literal["auto", "local", "slurm"] = Field(default="auto", description=(
        "`slurm` (one array job, a task per cell), `local` (processes on this machine), `auto`: slurm where sbatch "
        "exists; `--executor` overrides it"))
    slurm: SlurmConfig | None = Field(default=None, description=(
        "resources per cell (one process; nodes and tasks_per_node are ignored); unset: the base's slurm section"))
    local_parallelism: int = Field(default=1, gt=0, description=(
        "cells running at once with the local executor (each uses base.train.threads threads)"))

    @field_validator("grid")
    @classmethod
    def _grid_fits_the_recipe(cls, grid: SweepGrid, info: ValidationInfo) -> SweepGrid:
        base = info.data.get("base")
        if base is None:  # the base did not validate: its own error says why
            return grid
        arch = base.sae.arch
        if grid.l1_coefficients is not None and arch not in RELU_ARCHS:
            raise ValueError(f"l1_coefficients: λ is the L1 penalty of the ReLU recipes {', '.join(RELU_ARCHS)}; "
                             f"base.sae.arch is {arch}")
        if True in grid.resampling and arch != "relu_2023":
            raise ValueError(f"resampling: only the relu_2023 recipe resamples, base.sae.arch is {arch} (use "
                             "resampling: [false])")
        return grid

    @property
    def resolved_slurm(self) -> SlurmConfig:
        return self.slurm if self.slurm is not None else self.base.slurm

    def cells(self) -> list["Cell"]:
        """Every cell of the grid, in array-task order, with its validated training config."""
        lambdas = self.grid.l1_coefficients or [self.base.sae.l1_coefficient]
        resample_cfg = self.resample or self.base.sae.resample or ResampleConfig()
        out = []
        for index, (factor, lam, resample) in enumerate(itertools.product(self.grid.expansion_factors, lambdas,
                                                                          self.grid.resampling)):
            name = cell_name(factor, lam if self.grid.l1_coefficients is not None else None, resample)
            data = self.base.model_dump(mode="json")
            data["run_dir"] = str(Path(self.sweep_dir) / CELLS_DIR / name)
            data["sae"].update({"d_sae": factor * self.base.sae.d_in, "l1_coefficient": lam,
                                "resample": resample_cfg.model_dump(mode="json") if resample else None})
            out.append(Cell(index, name, factor, lam, resample, validate(TrainRunConfig, data, f"sweep cell {name}")))
        return out


@dataclass(frozen=True)
class Cell:
    index: int  # the array task
    name: str
    expansion: int
    l1_coefficient: float
    resample: bool
    train: TrainRunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir)


def cell_name(factor: int, lam: float | None, resample: bool) -> str:
    return f"x{factor}" + (f"-l1_{lam:g}" if lam is not None else "") + ("-resample" if resample else "-noresample")


def load_sweep_config(path: str | Path, overrides: list[str] = (), *, check_modules: bool = True) -> SweepConfig:
    """The sweep config with its base resolved; overrides address the sweep file's keys (`grid.l1_coefficients=[1]`,
    `base.train.steps=100`). A step whose module this build lacks is refused here, before any work."""
    path = Path(path)
    data = read_mapping(path)
    base = data.get("base")
    if isinstance(base, str):
        data["base"] = _load_stage_file(base, path)
    elif isinstance(base, dict) and "from" in base:
        data["base"] = _merged(_load_stage_file(base["from"], path), {k: v for k, v in base.items() if k != "from"})
    for assignment in overrides:
        apply_override(data, assignment)
    if isinstance(data.get("base"), dict) and isinstance(data.get("sweep_dir"), str):
        # the base's own run_dir is never trained in; each cell gets SWEEP_DIR/cells/<name>
        data["base"] = {**data["base"], "run_dir": str(Path(data["sweep_dir"]) / CELLS_DIR / "base")}
    cfg = validate(SweepConfig, data, str(path))
    if check_modules:
        check_stage_modules(cfg, str(path))
    return cfg


def check_stage_modules(cfg: SweepConfig, source: str) -> None:
    import importlib.util

    for step, module in STEP_MODULES.items():
        if getattr(cfg.stages, step) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{source}: stages.{step}: {module} is not part of this build; set stages.{step}=false")

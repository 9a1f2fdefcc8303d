"""What a submission leaves in its run directory (submission.json): the resolved config of every stage, the cluster,
and every job submitted for it (job ids, array task ids, submitit folders), resubmissions appended. Submitting into
a run directory whose record holds another config is refused."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.io import atomic_write_json

RECORD_FILE = "submission.json"
# How a stage is launched may change between submissions of one run; what it computes may not.
LAUNCH_KEYS = ("slurm", "resume", "telemetry")


def _what_it_computes(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in LAUNCH_KEYS}


@dataclass
class Submission:
    run_dir: Path
    kind: str  # extract, train or pipeline
    cluster: str
    configs: dict[str, dict]  # stage -> resolved config
    jobs: dict[str, list[dict]] = field(default_factory=dict)  # stage -> [{job_id, tasks: {task: id}, folder, at}]

    @property
    def path(self) -> Path:
        return self.run_dir / RECORD_FILE

    def add_job(self, stage: str, job_id: str, tasks: dict[int, str] | None, folder: str) -> None:
        self.jobs.setdefault(stage, []).append({"job_id": job_id, "tasks": {str(k): v for k, v in (tasks or {}).items()},
                                                "folder": folder, "submitted_at": time.time()})

    def latest_job_of(self, stage: str, task: int | None = None) -> tuple[str, str] | None:
        """(job id, submitit folder) of the newest job that ran `task` (None: the stage's single job)."""
        for job in reversed(self.jobs.get(stage, [])):
            if task is None and not job["tasks"]:
                return job["job_id"], job["folder"]
            if task is not None and str(task) in job["tasks"]:
                return job["tasks"][str(task)], job["folder"]
        return None

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"kind": self.kind, "cluster": self.cluster, "configs": self.configs,
                                      "jobs": self.jobs})


def load_submission(run_dir: str | Path) -> Submission | None:
    path = Path(run_dir) / RECORD_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return Submission(Path(run_dir), data["kind"], data["cluster"], data["configs"], data.get("jobs", {}))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: unreadable submission record: {err}") from None


def open_submission(run_dir: str | Path, kind: str, cluster: str, configs: dict[str, dict]) -> Submission:
    """The run directory's record for these configs, new or existing; a record of other configs is refused."""
    existing = load_submission(run_dir)
    if existing is None:
        return Submission(Path(run_dir), kind, cluster, configs)
    differing = []
    for stage in sorted(set(existing.configs) | set(configs)):
        old, new = _what_it_computes(existing.configs.get(stage, {})), _what_it_computes(configs.get(stage, {}))
        differing += [f"{stage}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if differing:
        raise ConfigError(f"{existing.path}: this run directory holds a submission of another config (differs in "
                          f"{', '.join(differing)}); use another run directory, or `--resume {run_dir}` to go on "
                          "with the recorded one")
    existing.configs, existing.cluster = configs, cluster  # launch settings may change
    return existing

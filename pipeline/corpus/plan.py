"""The extraction plan: one cheap pass over the selected part of the corpus, made once before the tasks start, that
gives every task its own share and everything that needs a global view.

The pass runs the corpus selection (budget, subset quotas, skips) exactly as one stream would, tokenizing but running
no model, and cuts the selected stream into units at record boundaries: at every file (HF: dataset shard) boundary
and after about `unit_tokens` selected tokens. For each unit it records the stream's state at its start (where to
start reading, and the selection counters that budget and quotas depend on), the first record of the next unit,
and the global id of its first context. A task then reads its own units only, from their start states, and makes
the same selection decisions and the same context ids as the single stream: its work is proportional to its share,
and the union of the tasks is the single stream's dataset. Units go to tasks as contiguous runs of about equal
tokens, so that a task reads sequentially.

The plan lives in the dataset root (plan.json); a restarted or resubmitted task follows the same plan.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config.schema import CorpusConfig
from pipeline.errors import CorpusError

from .stream import CorpusStream, Tokenize

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
PLAN_VERSION = 1
UNITS_PER_TASK = 4  # finer units than tasks, so that contiguous runs of them balance


def contexts_in(n_tokens: int, ctx_len: int) -> int:
    body = ctx_len - 1
    return -(-n_tokens // body)


@dataclass
class Unit:
    index: int
    start: dict  # CorpusStream state at the unit's first record (skips and per-task counters zeroed)
    stop: int | None  # global index of the first record of the next unit; None: the stream's own end
    first_context_id: int
    docs: int = 0
    tokens: int = 0
    contexts: int = 0
    source_part: int = 0  # file number, or HF shard


@dataclass
class Plan:
    version: int
    corpus: dict
    source: str  # the corpus source's fingerprint (file names and sizes, or the HF spec)
    tokenizer: str  # what tokenized it
    ctx_len: int
    num_tasks: int
    units: list[Unit]
    tasks: list[list[int]]  # unit indices per task, in stream order
    totals: dict = field(default_factory=dict)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {**asdict(self), "units": [asdict(u) for u in self.units]}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        if data.get("version") != PLAN_VERSION:
            raise CorpusError(f"plan version {data.get('version')!r} is not {PLAN_VERSION}")
        units = [Unit(**u) for u in data["units"]]
        return cls(**{**data, "units": units})

    def task_units(self, task_id: int) -> list[Unit]:
        return [self.units[i] for i in self.tasks[task_id]]

    def task_tokens(self, task_id: int) -> int:
        return sum(u.tokens for u in self.task_units(task_id))


def _unit_start(state: dict) -> dict:
    """A stream state to start a unit from: the selection counters stay; skips start at zero, so that each bad
    record is counted by the unit that reads it."""
    return {**state, "skips": {}}


def make_plan(corpus: CorpusConfig, tokenize: Tokenize, *, tokenizer: str, ctx_len: int, num_tasks: int,
              unit_tokens: int | None = None) -> Plan:
    """One selection pass over the corpus (see the module docstring). `unit_tokens` defaults to the selected total
    over UNITS_PER_TASK * num_tasks, which needs a first look at the budget: with a budget it is known up front;
    without one the units follow the files and a split of each into pieces of at most 2M tokens."""
    t0 = time.perf_counter()
    if unit_tokens is None:
        target = corpus.token_budget or 0
        unit_tokens = max(1, target // (UNITS_PER_TASK * num_tasks)) if target else 2_000_000
    stream = CorpusStream(corpus, tokenize)
    stream_start = stream.state()  # the first unit starts here, so that bad records before the first doc count too
    units: list[Unit] = []
    context_id = 0
    current: Unit | None = None
    for doc in stream:
        part = doc.state_before["position"][0]
        if current is None or part != current.source_part or current.tokens >= unit_tokens:
            if current is not None:
                current.stop = doc.index
            start = doc.state_before if units else stream_start
            current = Unit(len(units), _unit_start(start), None, context_id, source_part=part)
            units.append(current)
        n = contexts_in(len(doc.token_ids), ctx_len)
        current.docs += 1
        current.tokens += len(doc.token_ids)
        current.contexts += n
        context_id += n
    if not units:
        raise CorpusError("corpus: the selection is empty (no document with text, or every subset's quota is 0)")
    tasks = _contiguous_groups([u.tokens for u in units], num_tasks)
    plan = Plan(PLAN_VERSION, corpus.model_dump(mode="json"), stream.source.fingerprint, tokenizer, ctx_len,
                num_tasks, units, tasks,
                totals={"units": len(units), "docs": sum(u.docs for u in units), "tokens": sum(u.tokens for u in units),
                        "contexts": context_id, "records_read": stream.stats["records_read"],
                        "skips": stream.skips, "seconds": round(time.perf_counter() - t0, 3)})
    log.info("plan: %d units, %d docs, %d tokens, %d contexts over %d task(s), in %.1f s", len(units),
             plan.totals["docs"], plan.totals["tokens"], context_id, num_tasks, plan.totals["seconds"])
    return plan


def _contiguous_groups(weights: list[int], groups: int) -> list[list[int]]:
    """Cut 0..len(weights)-1 into `groups` contiguous runs of about equal weight (a run may be empty when there are
    fewer units than groups)."""
    total = sum(weights)
    out: list[list[int]] = [[] for _ in range(groups)]
    acc = 0
    for i, w in enumerate(weights):
        # the unit goes to the group its middle falls in
        g = min(groups - 1, int((acc + w / 2) * groups / total)) if total else i % groups
        out[g].append(i)
        acc += w
    return out


def load_plan(root: str | Path) -> Plan | None:
    path = Path(root) / PLAN_FILE
    if not path.exists():
        return None
    try:
        return Plan.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CorpusError(f"{path}: unreadable plan: {err}") from None

"""One task's share of the plan as a single resumable stream of contexts: its units, each read from the state the
plan recorded for it, up to the next unit's first record, with the plan's context ids."""
from __future__ import annotations

from typing import Iterator

from pipeline.config.schema import CorpusConfig
from pipeline.corpus import CorpusStream, Plan
from pipeline.corpus.stream import Tokenize

from .packing import Context, pack


class TaskCorpus:
    """`contexts()` yields this task's contexts in stream order; each carries in `resume` where to restart right
    after it: {"unit": k (position among the task's units), "corpus": the stream state before its document,
    "doc_first_context_id", "contexts_done_in_doc", "skips_before": the task's skips in its earlier units}."""

    def __init__(self, cfg: CorpusConfig, plan: Plan, task_id: int, tokenize: Tokenize, ctx_len: int, bos_id: int,
                 cursor: dict | None = None) -> None:
        self.cfg, self.tokenize, self.ctx_len, self.bos_id = cfg, tokenize, ctx_len, bos_id
        self.units = plan.task_units(task_id)
        self.cursor = cursor
        self._skips_before: dict[str, int] = dict(cursor.get("skips_before", {})) if cursor else {}
        self._stream: CorpusStream | None = None
        self.records_read = 0  # raw records this run read (bad ones included)

    @property
    def skips(self) -> dict[str, int]:
        """Bad records this task has counted, by reason, up to where it is."""
        total = dict(self._skips_before)
        if self._stream is not None:
            for reason, n in self._stream.skips.items():
                total[reason] = total.get(reason, 0) + n
        return total

    def contexts(self) -> Iterator[Context]:
        cursor = self.cursor
        first = cursor["unit"] if cursor else 0
        for k in range(first, len(self.units)):
            unit = self.units[k]
            resuming = cursor is not None and k == cursor["unit"]
            if self._stream is not None:  # the previous unit is done: its skips join the earlier units'
                self._skips_before = self.skips
            start = cursor["corpus"] if resuming else unit.start
            self._stream = CorpusStream(self.cfg, self.tokenize, resume=start, stop_at=unit.stop)
            read_before = self._stream.stats["records_read"]
            skips_before = dict(self._skips_before)
            for ctx in pack(self._stream, self.ctx_len, self.bos_id,
                            first_context_id=cursor["doc_first_context_id"] if resuming else unit.first_context_id,
                            skip_in_first_doc=cursor["contexts_done_in_doc"] if resuming else 0):
                ctx.resume["unit"] = k
                ctx.resume["skips_before"] = skips_before
                yield ctx
            self.records_read += self._stream.stats["records_read"] - read_before

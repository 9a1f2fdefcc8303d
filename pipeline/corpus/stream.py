"""The one corpus stream every stage reads: selection (budget, subset quotas), tokenization, resumable state.

Selection is a function of the stream's state only (the records read so far and the tokens selected so far, in
total and per subset), so a stream started from a saved state, and stopped before a given record, makes exactly the
choices the whole stream makes over that range. The extraction plan (pipeline.corpus.plan) rests on that: each task
reads its own ranges of records, from the states the plan recorded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..config.schema import CorpusConfig
from .records import SKIP_REASONS, CorpusError, RawRecord, open_source

log = logging.getLogger(__name__)

Tokenize = Callable[[list[str]], list[list[int]]]
STATE_VERSION = 1
# Warnings logged per skip reason before the stream only counts; the end-of-stream summary has the totals.
WARN_FIRST = 5
# Records held before a batch is selected, in units of tokenize_batch.
PENDING_RECORDS = 4


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields with == is ambiguous
class TokenizedDoc:
    index: int              # index of this record in the global raw record stream (bad records have indices too)
    doc_id: str
    subset: str
    token_ids: np.ndarray   # int32, without BOS, already cut to what the budget / quota allows; len >= 1
    state_before: dict      # CorpusStream(..., resume=state_before) yields this doc first


def batch_tokenizer(tokenizer) -> Tokenize:
    """The batch call of a fast tokenizer (transformers or a raw `tokenizers.Tokenizer`), without special tokens."""
    if hasattr(tokenizer, "encode_batch"):
        return lambda texts: [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _new_stats() -> dict:
    return {
        "records_read": 0,          # raw records consumed, bad ones included (global)
        "docs_selected": 0,         # docs yielded (global)
        "tokens_selected": 0,       # tokens yielded (global); equals the budget once it is reached
        "tokens_by_subset": {},
        "docs_by_subset": {},
        "truncated_docs": 0,        # docs cut by the budget or a quota
        "quota_excluded_docs": 0,   # good docs of a subset whose quota was already spent
        "empty_token_docs": 0,      # good docs that tokenized to nothing
    }


class CorpusStream:
    """Iterate to get every selected doc in stream order, from the start or from a saved state, up to the source's
    end, the budget, or the record `stop_at`.

    Each iteration continues from `state()`, so abandoning a loop and iterating again picks up right after the
    last doc yielded. `skips` counts the bad records this stream read (a plan's unit starts them at zero, so that
    summing over units gives the total) and `stats` the selection so far (from the stream's start, carried in the state).
    """

    def __init__(self, cfg: CorpusConfig, tokenize: Tokenize, *, resume: dict | None = None, stop_at: int | None = None):
        for subset, quota in cfg.subset_quotas.items():
            if quota < 0:
                raise CorpusError(f"corpus.subset_quotas[{subset!r}]: must be >= 0, got {quota}")
        self.cfg = cfg
        self.tokenize = tokenize
        self.source = open_source(cfg.paths, cfg.hf, cfg.on_corrupt_file)
        # Sequential stream state: everything selection and counting depend on, advanced record by record.
        self._next_index = 0
        self._position = (0, 0)
        self._done = False
        self._skips: dict[str, int] = {}
        self._stats = _new_stats()
        # The record index this stream ends before (the start of the next unit of a plan); None: the source's end.
        self.stop_at = stop_at
        if resume is not None:
            self._load(resume)

    # ------------------------------------------------------------------------------------------ state

    @property
    def skips(self) -> dict[str, int]:
        return dict(self._skips)

    @property
    def stats(self) -> dict:
        return _copy(self._stats)

    def state(self) -> dict:
        """JSON-serialisable state after the last yielded doc (after the whole stream once iteration ends)."""
        return {
            "version": STATE_VERSION,
            "source": self.source.fingerprint,
            "next_index": self._next_index,
            "position": list(self._position),
            "done": self._done,
            "skips": dict(self._skips),
            "stats": _copy(self._stats),
        }

    def _load(self, state: dict) -> None:
        try:
            if state["version"] != STATE_VERSION:
                raise CorpusError(f"corpus resume state: version {state['version']} is not {STATE_VERSION}")
            if state["source"] != self.source.fingerprint:
                raise CorpusError("corpus resume state: made for different corpus files or dataset")
            self._next_index = int(state["next_index"])
            file_no, line_no = state["position"]
            self._position = (int(file_no), int(line_no))
            self._done = bool(state["done"])
            self._skips = {str(k): int(v) for k, v in state["skips"].items()}
            self._stats = _new_stats() | _copy(state["stats"])
        except CorpusError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CorpusError(f"corpus resume state: malformed ({type(err).__name__}: {err})") from None

    # -------------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[TokenizedDoc]:
        if self._done:
            return
        records = self.source.read(self._next_index, self._position)
        pending: list[RawRecord] = []
        texts_pending = 0
        try:
            for rec in records:
                if self.stop_at is not None and rec.index >= self.stop_at:
                    records.close()
                    yield from self._select(pending)
                    self._done = True
                    break
                pending.append(rec)
                if rec.text is not None and not self._quota_spent(rec.subset):
                    texts_pending += 1
                # The record cap bounds memory when most records are bad or quota-excluded and so fill no batch.
                if texts_pending == self.cfg.tokenize_batch or len(pending) >= PENDING_RECORDS * self.cfg.tokenize_batch:
                    yield from self._select(pending)
                    if self._done:
                        records.close()
                        break
                    pending, texts_pending = [], 0
            else:
                yield from self._select(pending)
                self._done = True
        except CorpusError:
            # Damage found while a batch was filling: the records read before it are still good, so hand them on first.
            yield from self._select(pending)
            raise
        self._log_summary()

    def _select(self, batch: list[RawRecord]) -> Iterator[TokenizedDoc]:
        """Tokenize the batch in one call, then apply budget and quotas record by record, in stream order."""
        # A subset spent before this batch stays spent, so its texts need no tokenizing. Whether a doc is
        # excluded is decided below, sequentially, so the counts do not depend on where batches fall.
        wanted = [i for i, rec in enumerate(batch) if rec.text is not None and not self._quota_spent(rec.subset)]
        token_lists = self.tokenize([batch[i].text for i in wanted]) if wanted else []
        if len(token_lists) != len(wanted):
            raise CorpusError(f"corpus: tokenizer returned {len(token_lists)} token lists for {len(wanted)} texts")
        tokens_of = dict(zip(wanted, token_lists))
        stats, budget = self._stats, self.cfg.token_budget
        for i, rec in enumerate(batch):
            if rec.skip is not None:
                self._advance(rec)
                self._count_skip(rec)
                continue
            room = self._quota_room(rec.subset)
            if room == 0:
                stats["quota_excluded_docs"] += 1
                self._advance(rec)
                continue
            ids = tokens_of[i]
            if len(ids) == 0:
                stats["empty_token_docs"] += 1
                self._advance(rec)
                continue
            keep = len(ids) if room is None else min(len(ids), room)
            if budget is not None:
                keep = min(keep, budget - stats["tokens_selected"])  # > 0: the stream ends when the budget is spent
            token_ids = np.asarray(ids[:keep], dtype=np.int32)
            state_before = self.state()
            self._advance(rec)
            self._count_doc(rec.subset, len(token_ids), truncated=len(token_ids) < len(ids))
            if budget is not None and stats["tokens_selected"] >= budget:
                self._done = True
            yield TokenizedDoc(rec.index, rec.doc_id, rec.subset, token_ids, state_before)
            if self._done:
                return

    def _advance(self, rec: RawRecord) -> None:
        self._next_index = rec.index + 1
        self._position = rec.position
        self._stats["records_read"] += 1

    def _count_doc(self, subset: str, n_tokens: int, truncated: bool) -> None:
        stats = self._stats
        stats["docs_selected"] += 1
        stats["tokens_selected"] += n_tokens
        stats["tokens_by_subset"][subset] = stats["tokens_by_subset"].get(subset, 0) + n_tokens
        stats["docs_by_subset"][subset] = stats["docs_by_subset"].get(subset, 0) + 1
        stats["truncated_docs"] += truncated

    def _count_skip(self, rec: RawRecord) -> None:
        count = self._skips[rec.skip] = self._skips.get(rec.skip, 0) + 1
        if rec.skip == "corrupt_file" or count <= WARN_FIRST:
            more = " (further ones only counted)" if count == WARN_FIRST and rec.skip != "corrupt_file" else ""
            log.warning("corpus: skipped %s (%s): %s%s", rec.doc_id, rec.skip, rec.detail, more)

    def _quota_room(self, subset: str) -> int | None:
        """Tokens this subset may still take; None when uncapped."""
        quotas = self.cfg.subset_quotas
        quota = quotas.get(subset, quotas.get("*"))
        if quota is None:
            return None
        return max(0, quota - self._stats["tokens_by_subset"].get(subset, 0))

    def _quota_spent(self, subset: str) -> bool:
        return self._quota_room(subset) == 0

    def _log_summary(self) -> None:
        s = self._stats
        log.debug("corpus: %d records read, %d docs / %d tokens selected from the stream's start; skips here %s",
                  s["records_read"], s["docs_selected"], s["tokens_selected"], self._skips or "none")


def _copy(stats: dict) -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in stats.items()}


__all__ = ["CorpusStream", "TokenizedDoc", "batch_tokenizer", "SKIP_REASONS"]

"""Corpus stage: Pile-format records streamed, selected and tokenized; the plan that splits the selection over tasks."""
from .plan import PLAN_FILE, Plan, Unit, load_plan, make_plan
from .records import SKIP_REASONS, CorpusError, FileRecords, HFRecords, RawRecord, open_source, resolve_paths
from .stream import CorpusStream, TokenizedDoc, batch_tokenizer

__all__ = [
    "PLAN_FILE", "Plan", "SKIP_REASONS", "CorpusError", "CorpusStream", "FileRecords", "HFRecords", "RawRecord",
    "TokenizedDoc", "Unit", "batch_tokenizer", "load_plan", "make_plan", "open_source", "resolve_paths",
]

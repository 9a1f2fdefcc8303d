"""Corpus stage: Pile-format records streamed, selected, partitioned over tasks and tokenized."""
from .records import SKIP_REASONS, CorpusError, FileRecords, HFRecords, RawRecord, open_source, resolve_paths
from .stream import CorpusStream, TokenizedDoc, batch_tokenizer

__all__ = [
    "SKIP_REASONS", "CorpusError", "FileRecords", "HFRecords", "RawRecord", "open_source", "resolve_paths",
    "CorpusStream", "TokenizedDoc", "batch_tokenizer",
]

"""Reverse lookup: a stored row back to its token in readable context."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Lookup:
    row: int
    context_id: int
    pos: int
    token_id: int
    token: str
    doc_id: str
    subset: str
    text_before: str
    text_after: str
    marked: str  # text_before «token» text_after, with … where the context was cut short

    def __str__(self) -> str:
        text = self.marked.replace("\r", "").replace("\n", "⏎ ")
        return (f"row {self.row} | {self.subset} | doc {self.doc_id} | context {self.context_id} pos {self.pos} | "
                f"token {self.token!r} (id {self.token_id}): {text}")


def make_lookup(row: int, context_id: int, pos: int, token_ids: list[int], doc_id: str, subset: str, decode,
                context_tokens: int | None) -> Lookup:
    """`token_ids` is the whole context, BOS at index 0 (left out of the text); `decode` maps ids to text."""
    start = 1 if context_tokens is None else max(1, pos - context_tokens)
    end = len(token_ids) if context_tokens is None else min(len(token_ids), pos + 1 + context_tokens)
    before = decode(token_ids[start:pos])
    token = decode([token_ids[pos]])
    after = decode(token_ids[pos + 1 : end])
    marked = ("…" if start > 1 else "") + f"{before}«{token}»{after}" + ("…" if end < len(token_ids) else "")
    return Lookup(row=row, context_id=context_id, pos=pos, token_id=int(token_ids[pos]), token=token, doc_id=doc_id,
                  subset=subset, text_before=before, text_after=after, marked=marked)

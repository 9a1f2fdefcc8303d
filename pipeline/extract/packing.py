"""Cut documents into contexts of `ctx_len` tokens, each starting with BOS, and give every context a global id.

Contexts never span documents, so a context is fully named by (doc_id, doc_start) and is the same whatever the
number of tasks. Ids count the contexts of every selected document of the whole stream: a task starts each of its
plan's units at the unit's first context id (pipeline.corpus.plan).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np


@dataclass
class Context:
    context_id: int
    doc_id: str
    subset: str
    doc_start: int  # offset in the document's tokens of token_ids[1]
    token_ids: np.ndarray  # int32, BOS first
    # Where to restart right after this context: the corpus state before its document, how many of that document's
    # contexts are done, and the id of the document's first context.
    resume: dict


def contexts_per_doc(n_tokens: int, ctx_len: int) -> int:
    body = ctx_len - 1
    return -(-n_tokens // body)


def pack(docs: Iterable, ctx_len: int, bos_id: int, *, first_context_id: int = 0, skip_in_first_doc: int = 0) -> Iterator[Context]:
    """Contexts in stream order. `first_context_id`/`skip_in_first_doc` restart inside a document after a resume."""
    body = ctx_len - 1
    next_id = first_context_id
    skip = skip_in_first_doc
    for doc in docs:
        n_ctx = contexts_per_doc(len(doc.token_ids), ctx_len)
        doc_first = next_id
        next_id += n_ctx
        tokens = np.asarray(doc.token_ids, dtype=np.int32)
        for j in range(skip, n_ctx):
            chunk = tokens[j * body : (j + 1) * body]
            ids = np.empty(len(chunk) + 1, dtype=np.int32)
            ids[0] = bos_id
            ids[1:] = chunk
            yield Context(
                context_id=doc_first + j,
                doc_id=doc.doc_id,
                subset=doc.subset,
                doc_start=j * body,
                token_ids=ids,
                resume={"corpus": doc.state_before, "doc_first_context_id": doc_first, "contexts_done_in_doc": j + 1},
            )
        skip = 0

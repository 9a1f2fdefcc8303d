"""Reading what jobs append to and what plots are written as, the shared-file-system way."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import tmp_path


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log (none when it is missing); a line cut short by a kill is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def save_png(fig, path: str | Path, *, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG put in place whole (a reader never sees half a file)."""
    tmp = tmp_path(path)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

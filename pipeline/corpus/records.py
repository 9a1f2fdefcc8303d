"""Raw Pile-format records from local .jsonl / .jsonl.zst files or a `datasets` streaming source, in constant memory.

Every non-blank line (or HF row) is one raw record and gets the next global index, bad or not, so that the
index alone says which task owns a record. Bad records come through with `skip` set to the reason instead of
being dropped here: the stream decides who counts and logs them. Blank lines are not records.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import zstandard

from pipeline.config.schema import HFSource
from pipeline.errors import CorpusError

log = logging.getLogger(__name__)

SKIP_REASONS = ("invalid_json", "missing_text", "non_string_text", "invalid_utf8", "empty_text", "corrupt_file")
# Bytes read (and decompressed bytes produced) per step: bounds memory, and how much good text
# a corrupt block can take down with it.
READ_CHUNK = 1 << 16
# Pile shards were written with large windows; allow up to 2 GiB rather than zstd's 128 MiB default.
MAX_WINDOW = 1 << 31


@dataclass(frozen=True, slots=True)
class RawRecord:
    index: int                 # position in the global raw record stream
    doc_id: str
    subset: str
    text: str | None           # None for a bad record
    skip: str | None           # reason from SKIP_REASONS when bad
    detail: str                # why it was skipped, for the log
    position: tuple[int, int]  # files: (file number, physical lines consumed in it); HF: (shard, rows consumed in it)


def parse_record(obj: object) -> tuple[str | None, str | None, str, str]:
    """(text, skip reason, detail, subset) of one decoded JSON object or HF row."""
    if not isinstance(obj, dict) or "text" not in obj:
        return None, "missing_text", "no 'text' key", "unknown"
    text = obj["text"]
    subset = _subset(obj.get("meta"))
    if not isinstance(text, str):
        return None, "non_string_text", f"'text' is {type(text).__name__}", subset
    try:
        text.encode("utf-8")  # json.loads lets lone surrogates through ("\ud800"); tokenizers choke on them
    except UnicodeEncodeError:
        return None, "invalid_utf8", "lone surrogate in 'text'", subset
    if not text or text.isspace():
        return None, "empty_text", "empty or whitespace-only 'text'", subset
    return text, None, "", subset


def _subset(meta: object) -> str:
    if isinstance(meta, str):  # some dumps store meta as a JSON string
        try:
            meta = json.loads(meta)
        except ValueError:
            return "unknown"
    name = meta.get("pile_set_name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and name else "unknown"


# ----------------------------------------------------------------------------------------------- files

def resolve_paths(patterns: list[str]) -> list[Path]:
    """Files named by paths or globs, in the order given, each glob sorted; the same file twice is read once."""
    files: list[Path] = []
    seen: set[str] = set()
    for pattern in patterns:
        matches = sorted(m for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m))
        if not matches:
            raise CorpusError(f"corpus.paths: no file matches {pattern!r}")
        for match in matches:
            real = os.path.realpath(match)
            if real in seen:
                log.warning("corpus: %s is named twice in corpus.paths; reading it once", match)
                continue
            seen.add(real)
            files.append(Path(match))
    return files


def doc_names(files: list[Path]) -> list[str]:
    """File names for doc ids; files sharing a name use their path relative to the common parent of that group."""
    by_name: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        by_name.setdefault(f.name, []).append(i)
    names = [f.name for f in files]
    for group in by_name.values():
        if len(group) > 1:
            absolute = [os.path.abspath(files[i]) for i in group]
            parent = os.path.commonpath([os.path.dirname(a) for a in absolute])
            for i, a in zip(group, absolute):
                names[i] = Path(os.path.relpath(a, parent)).as_posix()
    return names


class _Damaged(Exception):
    """Raised inside the chunk reader; turned into CorpusError or a corrupt_file record by the caller."""


class _FrameWalker:
    """File wrapper that walks zstd frame and block headers in the compressed bytes read through it.

    `stream_reader` (bounded output, unlike decompressobj) ends silently when the input stops mid-frame;
    walking the headers tells whether the input ended on a frame boundary. Only headers are parsed, and
    block payloads are skipped, so it costs next to nothing.
    """

    def __init__(self, fh):
        self.fh = fh
        self.head = bytearray()   # header bytes gathered so far
        self.need = 4             # header bytes the current step wants
        self.skip = 0             # payload bytes to pass over
        self.step = self._magic
        self.checksum = False

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        i, n = 0, len(data)
        while i < n:
            if self.skip:
                taken = min(self.skip, n - i)
                self.skip -= taken
                i += taken
                continue
            taken = min(self.need - len(self.head), n - i)
            self.head += data[i:i + taken]
            i += taken
            while len(self.head) == self.need and not self.skip:
                header, self.head = bytes(self.head), bytearray()
                self.step(header)
        return data

    def at_frame_boundary(self) -> bool:
        return self.step == self._magic and not self.head and not self.skip

    def _expect(self, need: int, step, skip: int = 0) -> None:
        self.need, self.step, self.skip = need, step, skip

    def _magic(self, b: bytes) -> None:
        magic = int.from_bytes(b, "little")
        if magic == 0xFD2FB528:
            self._expect(1, self._descriptor)
        elif magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame: 4-byte size, then that many bytes
            self._expect(4, lambda size: self._expect(4, self._magic, int.from_bytes(size, "little")))
        else:
            raise _Damaged(f"not a zstd frame (magic {magic:#010x})")

    def _descriptor(self, b: bytes) -> None:
        d = b[0]
        single_segment = bool(d & 0x20)
        self.checksum = bool(d & 0x04)
        content_size = (1 if single_segment else 0, 2, 4, 8)[d >> 6]
        rest = (0 if single_segment else 1) + (0, 1, 2, 4)[d & 0x03] + content_size
        if rest:
            self._expect(rest, lambda _: self._expect(3, self._block))
        else:
            self._expect(3, self._block)

    def _block(self, b: bytes) -> None:
        header = int.from_bytes(b, "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise _Damaged("reserved zstd block type")
        payload = 1 if kind == 1 else size  # an RLE block stores one byte
        after = 4 if last and self.checksum else 0
        if not last:
            self._expect(3, self._block, payload)
        elif after:
            self._expect(after, lambda _: self._expect(4, self._magic), payload)
        else:
            self._expect(4, self._magic, payload)


def _chunks(fh, compressed: bool) -> Iterator[bytes]:
    if not compressed:
        while chunk := fh.read(READ_CHUNK):
            yield chunk
        return
    walker = _FrameWalker(fh)
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    reader = dctx.stream_reader(walker, read_size=READ_CHUNK, read_across_frames=True)
    while True:
        try:
            chunk = reader.read(READ_CHUNK)
        except zstandard.ZstdError as err:
            raise _Damaged(str(err)) from None
        if not chunk:
            break
        yield chunk
    if not walker.at_frame_boundary():
        raise _Damaged("truncated zstd frame at end of file")


def _lines(chunks: Iterator[bytes], skip_lines: int) -> Iterator[bytes]:
    """Physical lines without their newline, after skipping `skip_lines` of them by counting newlines only.

    The final line is yielded even without a newline: only a *damaged* file loses its partial last line,
    because the damage exception leaves this generator before the end.
    """
    parts: list[bytes] = []
    ends_with_newline = True
    for chunk in chunks:
        ends_with_newline = chunk.endswith(b"\n")
        start = 0
        if skip_lines:
            newlines = chunk.count(b"\n")
            if newlines < skip_lines:
                skip_lines -= newlines
                continue
            for _ in range(skip_lines):
                start = chunk.index(b"\n", start) + 1
            skip_lines = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if parts:
                parts.append(chunk[start:end])
                yield b"".join(parts)
                parts = []
            else:
                yield chunk[start:end]
            start = end + 1
        if start < len(chunk):
            parts.append(chunk[start:])
    # An unterminated final line was skipped as a whole line, though no newline counted it.
    if skip_lines and not (skip_lines == 1 and not ends_with_newline):
        raise CorpusError(f"resume point is past the end of the file ({skip_lines} lines short)")
    if parts:
        yield b"".join(parts)


def _decode_line(line: bytes) -> tuple[str | None, str | None, str, str]:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, "invalid_utf8", f"invalid UTF-8 at byte {err.start}", "unknown"
    try:
        obj = json.loads(decoded)
    except ValueError as err:
        return None, "invalid_json", f"invalid JSON: {err}", "unknown"
    return parse_record(obj)


class FileRecords:
    """Records of local Pile-format files, read line by line."""

    def __init__(self, patterns: list[str], on_corrupt_file: Literal["error", "skip"] = "error"):
        self.files = resolve_paths(patterns)
        self.names = doc_names(self.files)
        self.on_corrupt_file = on_corrupt_file
        listing = [(name, os.path.getsize(f)) for name, f in zip(self.names, self.files)]
        self.fingerprint = hashlib.sha1(json.dumps(listing).encode()).hexdigest()[:16]

    def read(self, index: int = 0, position: tuple[int, int] = (0, 0)) -> Iterator[RawRecord]:
        """Records from global index `index`, which sits `position[1]` physical lines into file `position[0]`."""
        first_file, skip_lines = position
        for file_no in range(first_file, len(self.files)):
            path, name = self.files[file_no], self.names[file_no]
            line_no = skip_lines if file_no == first_file else 0
            try:
                with open(path, "rb") as fh:
                    lines = _lines(_chunks(fh, path.name.endswith(".zst")), line_no)
                    for line in lines:
                        line_no += 1
                        if not line or line.isspace():
                            continue
                        text, skip, detail, subset = _decode_line(line)
                        yield RawRecord(index, f"{name}:{line_no}", subset, text, skip, detail, (file_no, line_no))
                        index += 1
            except _Damaged as err:
                message = f"{path}: corrupt or damaged file after line {line_no}: {err}"
                if self.on_corrupt_file == "error":
                    raise CorpusError(message) from None
                # A damaged file is one raw record of its own, so that exactly one task counts it.
                yield RawRecord(index, f"{name}:{line_no + 1}", "unknown", None, "corrupt_file", message, (file_no + 1, 0))
                index += 1
            except CorpusError as err:
                raise CorpusError(f"{path}: {err}") from None
            except OSError as err:
                raise CorpusError(f"{path}: cannot read: {err.strerror or err}") from None


# -------------------------------------------------------------------------------------------------- HF

class HFRecords:
    """Records of a `datasets` streaming source, read shard by shard (a shard is one of its data files, which
    `n_shards` counts), so that a task can start at its own shard instead of streaming all the ones before it.
    Doc ids are "{name}:{split}:{row}" with the row's index in the whole stream."""

    def __init__(self, src: HFSource):
        self.src = src
        self.fingerprint = hashlib.sha1(src.model_dump_json().encode()).hexdigest()[:16]

    def _open(self):
        import datasets  # heavy import, only for this source

        src = self.src
        try:
            return datasets.load_dataset(src.name, src.config_name, split=src.split, streaming=True,
                                         data_files=src.data_files, revision=src.revision)
        except Exception as err:  # datasets raises many unrelated types; all mean "cannot open this source"
            raise CorpusError(f"{self._label()}: cannot open: {_first_line(err)}") from None

    def _label(self) -> str:
        return f"hf dataset {self.src.name!r} split {self.src.split!r}"

    def read(self, index: int = 0, position: tuple[int, int] = (0, 0)) -> Iterator[RawRecord]:
        """Records from global index `index`, which is row `position[1]` of shard `position[0]`."""
        ds = self._open()
        n_shards = max(1, getattr(ds, "n_shards", 1) or 1)
        first_shard, skip_rows = position
        src = self.src
        for shard_no in range(first_shard, n_shards):
            part = ds if n_shards == 1 else ds.shard(num_shards=n_shards, index=shard_no, contiguous=True)
            row_no = skip_rows if shard_no == first_shard else 0
            if row_no:
                part = part.skip(row_no)
            rows = iter(part)
            while True:
                try:
                    row = next(rows)
                except StopIteration:
                    break
                except Exception as err:
                    # No next file to move on to inside one shard, so a damaged source is an error in both modes.
                    raise CorpusError(f"{self._label()}: cannot read row {index} (shard {shard_no}): {_first_line(err)}") from None
                # A missing "text" column comes through as None, so None counts as missing rather than non-string.
                if isinstance(row, dict) and row.get("text") is None:
                    row = {k: v for k, v in row.items() if k != "text"}
                text, skip, detail, subset = parse_record(row)
                row_no += 1
                yield RawRecord(index, f"{src.name}:{src.split}:{index}", subset, text, skip, detail, (shard_no, row_no))
                index += 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def open_source(paths: list[str], hf: HFSource | None, on_corrupt_file: Literal["error", "skip"]) -> FileRecords | HFRecords:
    return HFRecords(hf) if hf is not None else FileRecords(paths, on_corrupt_file)

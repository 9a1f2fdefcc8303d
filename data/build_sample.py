"""Build the bundled Pile-format sample corpus from free Debian text packages.

    python data/build_sample.py --out data/pile-sample

Each output line is `{"text": ..., "meta": {"pile_set_name": SUBSET}}`, zstd-compressed.
The .deb files are fetched with `apt-get download` and unpacked with `dpkg-deb -x` into a
temporary directory, so nothing is installed on the system. The output is a pure function of
the package versions and the seed: inputs are sorted, shuffles are seeded, no timestamps.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import re
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import zstandard

logger = logging.getLogger(__name__)

# fortunes-min is part of the same source package (fortune-mod) and holds the classic
# "fortunes", "literature" and "riddles" files that `fortunes` depends on.
PACKAGES = ["bible-kjv", "bible-kjv-text", "fortunes", "fortunes-min", "jargon-text", "python3.11-doc"]

SUBSET_PACKAGES = {
    "Bible-KJV": ["bible-kjv-text", "bible-kjv"],
    "Fortunes": ["fortunes", "fortunes-min"],
    "Jargon": ["jargon-text"],
    "PythonDocs": ["python3.11-doc"],
}

# A phrase from each package's usr/share/doc/*/copyright that states the licence we rely on.
# If a new package version changes its terms, the build stops instead of mislabelling the data.
LICENCE_MARKERS = {
    "bible-kjv-text": "copyright for the King James Version text of the Bible is expired",
    "fortunes": "This program falls under the BSD copyright",
    "fortunes-min": "This program falls under the BSD copyright",
    "jargon-text": "This document (the Jargon File) is in the public domain",
    "python3.11-doc": "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2",
}

BIBLE_CHAPTERS = 1189
BIBLE_VERSES = 31102
DEFAULT_PYTHON_DOCS_MAX_BYTES = 4_000_000


@dataclass(frozen=True)
class Doc:
    subset: str
    text: str


# --------------------------------------------------------------------------- packages


def fetch_packages(workdir: Path, deb_dir: Path | None) -> dict[str, Path]:
    """Return {package: .deb path}; download into workdir unless deb_dir already holds them."""
    if deb_dir is None:
        deb_dir = workdir / "debs"
        deb_dir.mkdir()
        logger.info("apt-get download %s", " ".join(PACKAGES))
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=deb_dir, check=True, capture_output=True)
    debs = {}
    for package in PACKAGES:
        matches = sorted(deb_dir.glob(f"{package}_*.deb"))
        if len(matches) != 1:
            raise FileNotFoundError(f"{deb_dir}: expected one {package}_*.deb, found {len(matches)}")
        debs[package] = matches[0]
    return debs


def deb_version(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True).stdout.strip()


def extract(debs: dict[str, Path], root: Path) -> None:
    # One shared root, so the bible program and its data file end up side by side.
    for deb in debs.values():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)


def check_licences(root: Path) -> None:
    for package, marker in LICENCE_MARKERS.items():
        copyright_file = root / "usr/share/doc" / package / "copyright"
        if marker not in copyright_file.read_text(encoding="utf-8", errors="replace"):
            raise ValueError(f"{copyright_file}: licence statement {marker!r} not found; re-check the licence")


# --------------------------------------------------------------------------- subsets


def bible_docs(root: Path) -> list[Doc]:
    """One document per chapter, dumped by the packaged `bible` program."""
    data_dir = root / "usr/lib"
    # -l with a huge width keeps pretty-printing (chapter headings) without wrapping verses;
    # -p . plus cwd avoids the program's space-separated path list mangling odd temp paths.
    out = subprocess.run(
        [str(root / "usr/bin/bible"), "-l", "1000000", "-p", ".", "Gen1:1-Rev22:21"],
        cwd=data_dir, stdin=subprocess.DEVNULL, check=True, capture_output=True,
    ).stdout.decode("utf-8")
    chapters: list[tuple[str, list[str]]] = []
    verses = 0
    for line in out.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            chapters.append((line.strip(), []))
        elif re.match(r"^\s+\d+ ", line) and chapters:
            chapters[-1][1].append(line.strip())
            verses += 1
        else:
            raise ValueError(f"bible output: unexpected line {line[:60]!r}")
    if len(chapters) != BIBLE_CHAPTERS or verses != BIBLE_VERSES:
        raise ValueError(f"bible output: {len(chapters)} chapters / {verses} verses, expected {BIBLE_CHAPTERS} / {BIBLE_VERSES}")
    return [Doc("Bible-KJV", heading + "\n\n" + "\n".join(lines)) for heading, lines in chapters]


def fortune_docs(root: Path) -> list[Doc]:
    """One document per fortune; fortune files separate entries with lines holding only '%'."""
    docs = []
    for path in sorted((root / "usr/share/games/fortunes").iterdir()):
        # .dat files are binary indexes; .u8 entries are symlinks to the same text.
        if path.is_symlink() or not path.is_file() or path.suffix == ".dat":
            continue
        text = path.read_text(encoding="utf-8")
        for chunk in re.split(r"^%$", text, flags=re.MULTILINE):
            fortune = "\n".join(line.rstrip() for line in chunk.strip("\n").splitlines()).strip("\n")
            if fortune.strip():
                docs.append(Doc("Fortunes", fortune))
    return docs


JARGON_LETTER = re.compile(r"^  [0-9A-Z]$")
JARGON_ENTRY = re.compile(r"^   :[^:]+:")
# Headings use no-break spaces ("Appendix\xa0A."), hence \s rather than a plain space.
JARGON_SECTION = re.compile(r"^(Chapter\s\d+\.\s|Appendix\s[A-Z]\.\s|Bibliography$)")
JARGON_PART = re.compile(r"^\s{20,}Part\s[IV]+\.\s")


def _jargon_doc(lines: list[str]) -> Doc | None:
    # The heading sits at column 0 (sections) or 3 (entries) and the body is indented by 3: dedent the body alone.
    body = textwrap.dedent("\n".join(line.rstrip() for line in lines[1:])).strip("\n")
    text = (lines[0].strip() + "\n\n" + body).strip()
    return Doc("Jargon", text) if body.strip() else None


def _drop_tables_of_contents(lines: list[str]) -> list[str]:
    # A contents block is a run of short heading lines; it ends at the first prose line.
    kept, in_toc = [], False
    for line in lines:
        if line.strip() == "Table of Contents":
            in_toc = True
        elif in_toc and len(line.strip()) > 60:
            in_toc = False
        if not in_toc:
            kept.append(line)
    return kept


def jargon_docs(root: Path) -> list[Doc]:
    """One document per lexicon entry, plus one per chapter / appendix of the front and back matter."""
    lines = gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode("utf-8").splitlines()
    glossary_start = lines.index("Glossary")
    glossary_end = next(i for i, line in enumerate(lines) if re.match(r"^Appendix\sA\.\s", line))
    # The centred banner, not the same words in the table of contents above it.
    welcome = next(i for i, line in enumerate(lines) if re.match(r"^\s{10,}Welcome to the Jargon File$", line))

    entries: list[list[str]] = []
    current: list[str] | None = None
    for line in lines[glossary_start:glossary_end]:
        if JARGON_LETTER.match(line) or JARGON_PART.match(line):
            current = None  # both are followed by a list of names, not by entry text
        elif JARGON_ENTRY.match(line):
            current = [line]
            entries.append(current)
        elif current is not None:
            current.append(line)

    sections: list[list[str]] = [[]]
    for line in lines[welcome:glossary_start] + lines[glossary_end:]:
        if JARGON_PART.match(line):
            continue  # centred "Part I. Introduction" banners carry no text of their own
        if JARGON_SECTION.match(line):
            sections.append([])
        sections[-1].append(line)
    sections = [_drop_tables_of_contents(block) for block in sections]

    docs = [_jargon_doc(block) for block in sections + entries]
    return [doc for doc in docs if doc is not None]


def python_doc_docs(root: Path, max_bytes: int, seed: int) -> list[Doc]:
    """One document per `.rst.txt` source file, a seeded random subset capped at max_bytes."""
    sources = sorted(root.glob("usr/share/doc/python3*/html/_sources/**/*.rst.txt"))
    if not sources:
        raise FileNotFoundError(f"{root}: no python docs _sources/*.rst.txt found")
    order = list(sources)
    # A random pick, not the alphabetical head, so the sample spans library, howto, c-api, whatsnew.
    random.Random(f"{seed}:python-docs").shuffle(order)
    chosen, total = set(), 0
    for path in order:
        size = len(path.read_text(encoding="utf-8").strip().encode("utf-8"))
        if total + size <= max_bytes:
            chosen.add(path)
            total += size
    return [Doc("PythonDocs", path.read_text(encoding="utf-8").strip()) for path in sources if path in chosen]


# --------------------------------------------------------------------------- output


def write_shards(docs: list[Doc], out_dir: Path, num_files: int, level: int) -> list[dict]:
    """Split the (already shuffled) stream into num_files byte-balanced zstd JSONL files."""
    lines = [
        (json.dumps({"text": d.text, "meta": {"pile_set_name": d.subset}}, ensure_ascii=False) + "\n").encode("utf-8")
        for d in docs
    ]
    total = sum(map(len, lines))
    shards: list[list[bytes]] = [[] for _ in range(num_files)]
    written = 0
    for line in lines:
        shards[min(num_files - 1, written * num_files // total)].append(line)
        written += len(line)
    compressor = zstandard.ZstdCompressor(level=level)
    info = []
    for i, shard in enumerate(shards):
        path = out_dir / f"pile-sample-{i:02d}.jsonl.zst"
        raw = b"".join(shard)
        path.write_bytes(compressor.compress(raw))
        info.append({"file": path.name, "docs": len(shard), "jsonl_bytes": len(raw), "zst_bytes": path.stat().st_size})
        logger.info("wrote %s: %d docs, %.2f MB -> %.2f MB", path, len(shard), len(raw) / 1e6, path.stat().st_size / 1e6)
    return info


def subset_stats(docs: list[Doc]) -> dict[str, dict[str, int]]:
    stats = {name: {"docs": 0, "text_bytes": 0} for name in SUBSET_PACKAGES}
    for doc in docs:
        stats[doc.subset]["docs"] += 1
        stats[doc.subset]["text_bytes"] += len(doc.text.encode("utf-8"))
    return stats


LICENCE_LINES = {
    "Bible-KJV": "public domain. The Debian copyright file of bible-kjv-text states that \"the copyright for the King James "
    "Version text of the Bible is expired\" (1611). (In the UK the KJV remains under Crown letters patent.) "
    "The BRS program that dumps it is GPL-2+, but only its text output is included here.",
    "Fortunes": "BSD. The copyright file of fortunes / fortunes-min (source fortune-mod) says \"This program falls under the "
    "BSD copyright\" (Regents of the University of California, 1991, advertising clause deleted) and gives no separate "
    "terms for the fortune texts; note that many fortunes quote third parties.",
    "Jargon": "public domain. The copyright file of jargon-text quotes the File itself: \"This document (the Jargon File) "
    "is in the public domain, to be freely used, shared, and modified.\" (Debian's packaging scripts are GPL.)",
    "PythonDocs": "PSF-2.0. The copyright file of python3.11-doc carries the Python licence stack (PSF License Agreement "
    "version 2, with the historical BeOpen / CNRI / CWI licences) covering \"Python ... and its associated "
    "documentation\"; the docs' own license page adds the Zero-Clause BSD licence for code examples.",
}

DESCRIPTIONS = {
    "Bible-KJV": "one document per chapter (heading `Book N`, then one numbered verse per line), dumped with the "
    "packaged `bible` program (`bible -l 1000000 -p . Gen1:1-Rev22:21` run in the extracted `usr/lib`)",
    "Fortunes": "one document per fortune from every text file in `usr/share/games/fortunes` (entries separated by `%` lines)",
    "Jargon": "Jargon File 4.4.7 (`jargon.txt.gz`): one document per lexicon entry, plus one per chapter / appendix "
    "of the front and back matter (tables of contents dropped)",
    "PythonDocs": "one document per reST source file (`html/_sources/**/*.rst.txt`), a seeded random subset capped in bytes",
}


def render_readme(stats: dict, args: argparse.Namespace) -> str:
    subsets = stats["subsets"]
    versions = stats["packages"]
    package_cells = {name: ", ".join(f"`{p}` {versions[p]}" for p in pkgs) for name, pkgs in SUBSET_PACKAGES.items()}
    rows = "\n".join(
        f"| {name} | {package_cells[name]} | {s['docs']:,} | {s['text_bytes']:,} |" for name, s in subsets.items()
    )
    files = "\n".join(f"| `{f['file']}` | {f['docs']:,} | {f['jsonl_bytes']:,} | {f['zst_bytes']:,} |" for f in stats["files"])
    licences = "\n".join(f"- **{name}**: {text}" for name, text in LICENCE_LINES.items())
    descriptions = "\n".join(f"- **{name}**: {text}." for name, text in DESCRIPTIONS.items())
    return f"""# Pile-format sample corpus

A small corpus in the format of The Pile, built only from free texts packaged in Debian 12 (bookworm) main.
Each line of the zstd-compressed JSONL files is

    {{"text": "...", "meta": {{"pile_set_name": "Bible-KJV" | "Fortunes" | "Jargon" | "PythonDocs"}}}}

Documents of all subsets are interleaved by a seeded shuffle (seed {stats['seed']}), so any prefix of the stream
(`pile-sample-00` first, then `pile-sample-01`) mixes all four subsets in proportion to their size.

## Contents

| subset | Debian packages (version) | documents | text bytes (UTF-8) |
|---|---|---|---|
{rows}

| file | documents | JSONL bytes | compressed bytes (zstd -{args.zstd_level}) |
|---|---|---|---|
{files}

{descriptions}

The Python docs are capped at {args.python_docs_max_bytes:,} bytes of text; the other subsets are complete.
`stats.json` holds the same figures in machine-readable form.

## Licences (checked against each package's `usr/share/doc/<package>/copyright`)

{licences}

The build stops if a package's copyright file no longer contains the statement quoted above.

## Rebuild

    python data/build_sample.py --out data/pile-sample

This runs `apt-get download` for {', '.join(f'`{p}`' for p in PACKAGES)} and unpacks them with `dpkg-deb -x` into a
temporary directory (nothing is installed). The output is byte-identical for the same package versions and seed
(inputs are sorted, shuffles use CPython's `random.Random` with a string seed, no timestamps are written);
if Debian has since published newer versions, pass `--deb-dir DIR` with the exact `.deb` files listed above
(e.g. from snapshot.debian.org) to reproduce this build.
"""


def build(args: argparse.Namespace) -> dict:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pile-sample-") as tmp:
        workdir = Path(tmp)
        debs = fetch_packages(workdir, Path(args.deb_dir) if args.deb_dir else None)
        versions = {package: deb_version(deb) for package, deb in debs.items()}
        root = workdir / "root"
        root.mkdir()
        extract(debs, root)
        check_licences(root)
        docs = (
            bible_docs(root)
            + fortune_docs(root)
            + jargon_docs(root)
            + python_doc_docs(root, args.python_docs_max_bytes, args.seed)
        )
    random.Random(f"{args.seed}:interleave").shuffle(docs)
    files = write_shards(docs, out_dir, args.num_files, args.zstd_level)
    stats = {"seed": args.seed, "packages": versions, "subsets": subset_stats(docs), "files": files}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(render_readme(stats, args), encoding="utf-8")
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/pile-sample", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--python-docs-max-bytes", type=int, default=DEFAULT_PYTHON_DOCS_MAX_BYTES)
    parser.add_argument("--num-files", type=int, default=2)
    parser.add_argument("--zstd-level", type=int, default=19)
    parser.add_argument("--deb-dir", default=None, help="use the .deb files in this directory instead of apt-get download")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stats = build(parse_args(argv))
    for name, s in stats["subsets"].items():
        logger.info("%-10s %6d docs %10d bytes", name, s["docs"], s["text_bytes"])


if __name__ == "__main__":
    main()

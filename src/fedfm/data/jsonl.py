"""JSON Lines files read line by line, so that every error names its line."""

from __future__ import annotations

import json
from pathlib import Path

from fedfm.errors import DataError


def read_jsonl(path: Path, where: str) -> tuple[list[dict], list[int]]:
    """JSON objects of a JSONL file and their line numbers; any bad line is a one-line DataError naming it.

    Parsed line by line (not pandas.read_json) so that errors can name the line.
    """
    records, lines = [], []
    try:
        fh = open(path, "rb")  # noqa: SIM115  (closed by the with below; open errors become one line)
    except OSError as exc:
        raise DataError(f"cannot read {where}: {exc.strerror}") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{where} is not valid UTF-8: line {lineno}, byte {raw[exc.start]:#04x} at column {exc.start + 1}"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where} line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where} line {lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
            lines.append(lineno)
    return records, lines

"""Spill files: records kept on disk, as JSON lines, when the database cannot take them.

A file's first line is a header naming its kind and the database its rows belong to (`database_identity`:
the URL with the password masked, a SQLite path made absolute); then one line per row,
`{"table": ..., "row": {...}}`, plus the database's `"reason"` in a `rejected` file. Kinds:
- `records-*.jsonl`: rows not written yet (buffer overflow, shutdown); replayed at start and by
  `python -m server db replay-spill`;
- `rejected-*.jsonl`: rows the database refused; replayed only on request (`--rejected`).
A file appears whole or not at all (written under a dot-name, synced, renamed). A replay claims a file by
renaming it to `<name>.claimed-<pid>`, so of several processes only one replays it; the claim of a process
that died is taken over by the next replay.
"""

import json
import os
import secrets
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

from sqlalchemy import DateTime
from sqlalchemy.engine import make_url

from server.db.models import Base
from server.services.records.store import Record

Kind = Literal["records", "rejected"]
FORMAT = "inference-server records spill 1"
CLAIM = ".claimed-"
# A row and, in a rejected file, why the database refused it.
Entry = tuple[Record, str | None]


class SpillFormatError(ValueError):
    pass


def database_identity(url: str) -> str:
    """The database a spill file belongs to, safe to write down: password masked, SQLite path absolute."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        parsed = parsed.set(database=str(Path(parsed.database).resolve()))
    return parsed.render_as_string(hide_password=True)


def _json_value(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot spill a {type(value).__name__}")


def write_spill(directory: Path, database: str, kind: Kind, entries: Sequence[Entry]) -> Path:
    """Write `entries` to a new spill file, atomically; returns its path. Blocking: call it in a thread."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
    temporary = directory / f".{name}.tmp"
    try:
        with temporary.open("w", encoding="utf-8") as out:
            out.write(json.dumps({"format": FORMAT, "kind": kind, "database": database, "rows": len(entries)}) + "\n")
            for record, reason in entries:
                line = {"table": record.table.name, "row": record.row}
                if reason is not None:
                    line["reason"] = reason
                out.write(json.dumps(line, default=_json_value) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, directory / name)
    except BaseException:
        # A half-written file is nobody's: the rows are still the caller's to keep or report.
        temporary.unlink(missing_ok=True)
        raise
    return directory / name


def read_header(path: Path) -> dict:
    with path.open(encoding="utf-8") as spill:
        try:
            header = json.loads(spill.readline())
        except ValueError:
            header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SpillFormatError(f"{path} is not a records spill file")
    return header


def _record(line: dict) -> Record:
    table = Base.metadata.tables[line["table"]]
    row = dict(line["row"])
    for column in table.columns:
        if isinstance(column.type, DateTime) and isinstance(row.get(column.name), str):
            row[column.name] = datetime.fromisoformat(row[column.name])
    return Record(table, row)


def read_records(path: Path) -> list[Record]:
    """The rows of a spill file (header checked); a malformed line raises SpillFormatError naming it."""
    read_header(path)
    records = []
    with path.open(encoding="utf-8") as spill:
        next(spill)
        for number, text in enumerate(spill, start=2):
            try:
                records.append(_record(json.loads(text)))
            except (ValueError, KeyError, TypeError) as exc:
                raise SpillFormatError(f"{path}, line {number}: {type(exc).__name__}: {exc}") from None
    return records


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def unclaimed_name(path: Path) -> Path:
    return path.with_name(path.name.split(CLAIM)[0])


def spill_files(directory: Path, kinds: Sequence[Kind]) -> list[Path]:
    """Files of these kinds ready to replay, oldest first: unclaimed ones and those claimed by a dead process."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        name, _, claimer = path.name.partition(CLAIM)
        if (
            name.endswith(".jsonl")
            and name.split("-", 1)[0] in kinds
            and (not claimer or (claimer.isdigit() and not _alive(int(claimer))))
        ):
            found.append(path)
    return sorted(found, key=lambda path: unclaimed_name(path).name)


def claim(path: Path) -> Path | None:
    """Take `path` for this process (atomic rename); None when another process took it first."""
    claimed = path.with_name(f"{unclaimed_name(path).name}{CLAIM}{os.getpid()}")
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        return None
    return claimed


def release(claimed: Path) -> Path:
    """Give a claimed file back, under its own name, for a later replay."""
    path = unclaimed_name(claimed)
    os.rename(claimed, path)
    return path

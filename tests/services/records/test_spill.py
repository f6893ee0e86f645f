"""Spill files on their own: what is written is read back as it was, a file is whole or absent, and a claim is
taken by one process only (a dead process's claim by the next)."""

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.engine import make_url

from server.db.analytics_models import RequestRecord
from server.db.models import GenerationRecord, PredictionRecord
from server.services.records.spill import (
    SpillFormatError,
    claim,
    database_identity,
    read_header,
    read_records,
    release,
    spill_files,
    unclaimed_name,
    write_spill,
)
from server.services.records.store import Record

DATABASE = "sqlite+aiosqlite:////var/lib/records.db"


def prediction(i: int, **fields) -> Record:
    row = {
        "id": f"p{i}",
        "text": f"text {i}",
        "label": "POSITIVE",
        "score": 0.5 + i / 100,
        "model": "m",
        "latency_ms": 1.25,
        "created_at": datetime(2024, 3, 1, 12, 0, i, 123456, tzinfo=UTC),
        **fields,
    }
    return Record(PredictionRecord.__table__, row)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_database_identity_masks_the_password():
    identity = database_identity("postgresql+asyncpg://app:s3cret@db.internal:5432/records")
    assert "s3cret" not in identity
    assert identity == "postgresql+asyncpg://app:***@db.internal:5432/records"


def test_a_relative_sqlite_path_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert database_identity("sqlite+aiosqlite:///./data/records.db") == (
        f"sqlite+aiosqlite:///{tmp_path.resolve() / 'data' / 'records.db'}"
    )
    assert database_identity("sqlite+aiosqlite:///records.db") == database_identity(
        f"sqlite+aiosqlite:///{tmp_path / 'records.db'}"
    )


def test_an_in_memory_sqlite_database_keeps_its_name():
    assert make_url(database_identity("sqlite+aiosqlite:///:memory:")).database == ":memory:"


def test_a_spilled_record_is_read_back_with_its_table_and_values(tmp_path):
    records = [
        prediction(1),
        prediction(2, text='quotes " and \\ and\nnewlines, NUL \x00 and ünïcödé'),
        Record(
            GenerationRecord.__table__,
            {
                "id": "g1",
                "prompt": "p",
                "generated_text": "p q",
                "completion": " q",
                "model": "m",
                "params": {"max_new_tokens": 1, "stop": ["\n"]},
                "finish_reason": "length",
                "prompt_tokens": 1,
                "completion_tokens": 1,
                "latency_ms": 1.0,
                "created_at": datetime(2024, 3, 1, tzinfo=UTC),
            },
        ),
    ]
    path = write_spill(tmp_path, DATABASE, "records", [(record, None) for record in records])
    assert read_records(path) == records
    assert [record.table for record in read_records(path)] == [
        PredictionRecord.__table__,
        PredictionRecord.__table__,
        GenerationRecord.__table__,
    ]


def test_a_spilled_timestamp_keeps_its_instant_and_its_offset(tmp_path):
    moment = datetime(2024, 10, 27, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    path = write_spill(tmp_path, DATABASE, "records", [(prediction(1, created_at=moment), None)])
    [record] = read_records(path)
    assert isinstance(record.row["created_at"], datetime)
    assert record.row["created_at"] == moment and record.row["created_at"].utcoffset() == timedelta(hours=2)


def test_a_text_that_looks_like_a_timestamp_stays_text(tmp_path):
    path = write_spill(tmp_path, DATABASE, "records", [(prediction(1, text="2024-03-01T12:00:00"), None)])
    [record] = read_records(path)
    assert record.row["text"] == "2024-03-01T12:00:00"


def test_the_header_names_the_format_kind_database_and_row_count(tmp_path):
    path = write_spill(tmp_path, DATABASE, "rejected", [(prediction(i), "bad") for i in range(3)])
    assert path.parent == tmp_path and path.name.startswith("rejected-") and path.name.endswith(".jsonl")
    header = read_header(path)
    assert (header["kind"], header["database"], header["rows"]) == ("rejected", DATABASE, 3)


def test_a_rejected_file_keeps_each_rows_reason_and_a_records_file_has_none(tmp_path):
    rejected = write_spill(tmp_path, DATABASE, "rejected", [(prediction(1), "NUL in text"), (prediction(2), "x")])
    lines = [json.loads(line) for line in rejected.read_text(encoding="utf-8").splitlines()[1:]]
    assert [line["reason"] for line in lines] == ["NUL in text", "x"]
    records = write_spill(tmp_path, DATABASE, "records", [(prediction(1), None)])
    assert "reason" not in json.loads(records.read_text(encoding="utf-8").splitlines()[1])


def test_an_empty_spill_has_a_header_and_no_rows(tmp_path):
    path = write_spill(tmp_path, DATABASE, "records", [])
    assert read_header(path)["rows"] == 0 and read_records(path) == []


def test_the_spill_directory_is_created_and_each_write_gets_a_file_of_its_own(tmp_path):
    directory = tmp_path / "a" / "b"
    paths = {write_spill(directory, DATABASE, "records", [(prediction(i), None)]) for i in range(5)}
    assert len(paths) == 5 and all(path.exists() for path in paths)
    assert sorted(path.name for path in directory.iterdir()) == sorted(path.name for path in paths)


def test_a_value_json_cannot_hold_fails_the_write_and_leaves_no_spill_file(tmp_path):
    with pytest.raises(TypeError, match="cannot spill a bytes"):
        write_spill(tmp_path, DATABASE, "records", [(prediction(1), None), (prediction(2, text=b"raw"), None)])
    assert list(tmp_path.iterdir()) == []  # not even its half-written temporary file
    assert spill_files(tmp_path, ("records", "rejected")) == []


@pytest.mark.parametrize(
    "content",
    ["", "not json\n", '{"format": "something else", "kind": "records"}\n', '["a list"]\n'],
    ids=["empty", "not-json", "other-format", "not-an-object"],
)
def test_a_file_that_is_not_a_spill_file_is_refused(tmp_path, content):
    path = tmp_path / "records-x.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SpillFormatError, match="not a records spill file"):
        read_header(path)
    with pytest.raises(SpillFormatError):
        read_records(path)


@pytest.mark.parametrize(
    "line",
    [
        "{truncated",
        json.dumps({"table": "no_such_table", "row": {"id": "x"}}),
        json.dumps({"row": {"id": "x"}}),
        json.dumps({"table": "predictions", "row": {"id": "x", "created_at": "yesterday"}}),
    ],
    ids=["truncated", "unknown-table", "no-table", "bad-timestamp"],
)
def test_a_malformed_row_is_refused_naming_its_file_and_line(tmp_path, line):
    path = write_spill(tmp_path, DATABASE, "records", [(prediction(1), None), (prediction(2), None)])
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([*lines[:2], line, lines[2]]) + "\n", encoding="utf-8")
    with pytest.raises(SpillFormatError, match=f"{path.name}, line 3: "):
        read_records(path)


def test_spill_files_lists_the_asked_kinds_oldest_first(tmp_path):
    names = [
        "records-20240301T120000Z-10-aaaa.jsonl",
        "records-20240101T000000Z-10-bbbb.jsonl",
        "rejected-20230101T000000Z-10-cccc.jsonl",
    ]
    for name in names:
        (tmp_path / name).write_text("", encoding="utf-8")
    for other in [".records-20200101T000000Z-1-dddd.jsonl.tmp", "records-notes.txt", "other-2020.jsonl"]:
        (tmp_path / other).write_text("", encoding="utf-8")
    (tmp_path / "records-20200101T000000Z-1-eeee.jsonl.d").mkdir()
    assert [path.name for path in spill_files(tmp_path, ("records",))] == [names[1], names[0]]
    assert [path.name for path in spill_files(tmp_path, ("rejected",))] == [names[2]]


def test_a_missing_spill_directory_has_no_files(tmp_path):
    assert spill_files(tmp_path / "absent", ("records", "rejected")) == []


def test_a_file_claimed_by_a_live_process_is_not_listed_and_one_claimed_by_a_dead_process_is(tmp_path):
    live = write_spill(tmp_path, DATABASE, "records", [(prediction(1), None)])
    dead = write_spill(tmp_path, DATABASE, "records", [(prediction(2), None)])
    odd = write_spill(tmp_path, DATABASE, "records", [(prediction(3), None)])
    live.rename(live.with_name(f"{live.name}.claimed-{os.getppid()}"))
    dead_claim = dead.with_name(f"{dead.name}.claimed-{dead_pid()}")
    dead.rename(dead_claim)
    odd.rename(odd.with_name(f"{odd.name}.claimed-someone"))
    assert spill_files(tmp_path, ("records",)) == [dead_claim]


def test_a_claimed_file_sorts_under_its_own_name(tmp_path):
    older = write_spill(tmp_path, DATABASE, "records", [(prediction(1), None)])
    newer = tmp_path / "records-29991231T235959Z-1-ffff.jsonl"
    newer.write_text(older.read_text(encoding="utf-8"), encoding="utf-8")
    claimed = older.with_name(f"{older.name}.claimed-{dead_pid()}")
    older.rename(claimed)
    assert spill_files(tmp_path, ("records",)) == [claimed, newer]


def test_a_file_is_claimed_once_and_released_under_its_own_name(tmp_path):
    path = write_spill(tmp_path, DATABASE, "records", [(prediction(1), None)])
    claimed = claim(path)
    assert claimed == path.with_name(f"{path.name}.claimed-{os.getpid()}")
    assert claimed.exists() and not path.exists()
    assert unclaimed_name(claimed) == path
    assert claim(path) is None, "a file another replay claimed first is not claimed again"
    assert spill_files(tmp_path, ("records",)) == [], "a file this (live) process claimed is not offered again"
    assert release(claimed) == path
    assert path.exists() and not claimed.exists()
    assert read_records(path) == [prediction(1)]


def test_a_dead_processs_claim_is_taken_over_under_this_processs_pid(tmp_path):
    path = write_spill(tmp_path, DATABASE, "records", [(prediction(1), None)])
    stale = path.with_name(f"{path.name}.claimed-{dead_pid()}")
    path.rename(stale)
    [found] = spill_files(tmp_path, ("records",))
    claimed = claim(found)
    assert claimed == path.with_name(f"{path.name}.claimed-{os.getpid()}")
    assert not stale.exists() and read_records(claimed) == [prediction(1)]
    assert claim(found) is None


def test_a_request_record_without_a_tenant_is_read_back_without_one(tmp_path):
    """Files spilled before tenants existed: the row is read as written; the table's default applies on insert."""
    row = {
        "id": "r1",
        "endpoint": "predict",
        "model": "m",
        "status": 200,
        "error": None,
        "items": 1,
        "cached_items": 0,
        "tokens_in": 0,
        "tokens_out": 0,
        "latency_ms": 3.0,
        "created_at": datetime(2024, 3, 1, tzinfo=UTC),
    }
    path = write_spill(tmp_path, DATABASE, "records", [(Record(RequestRecord.__table__, row), None)])
    [record] = read_records(path)
    assert record == Record(RequestRecord.__table__, row) and "tenant" not in record.row

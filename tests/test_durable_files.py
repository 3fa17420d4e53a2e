"""Durable output files: write_atomic fsyncs the data before the rename and the folder after it, append_durable
appends whole lines and fsyncs them, so that what they wrote survives a crash of the node."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from paragen.pipelines.outputs import append_durable, save_json, write_atomic


@pytest.fixture
def fsynced(monkeypatch) -> list[tuple[Path, bool]]:
    """What each os.fsync call flushed: (the path its fd names, whether that is a folder)."""
    calls: list[tuple[Path, bool]] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        calls.append((target, target.is_dir()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def test_write_atomic_fsyncs_the_data_then_the_folder(tmp_path, fsynced):
    path = tmp_path / "a.json"

    def write(tmp: Path) -> None:
        tmp.write_text("{}\n")
        assert fsynced == []  # nothing flushed before the data is written

    write_atomic(path, write)
    (data, data_is_dir), folder = fsynced
    assert data.parent == tmp_path and data.name.startswith(".a.json.") and data.name.endswith(".tmp")
    assert not data_is_dir and folder == (tmp_path, True)  # the temporary file before the rename, then the folder
    assert path.read_text() == "{}\n" and os.listdir(tmp_path) == ["a.json"]


def test_new_folders_are_made_durably(tmp_path, fsynced):
    path = save_json({"a": 1}, tmp_path / "new" / "sub" / "a.json")
    folders = [target for target, is_dir in fsynced if is_dir]
    assert folders == [tmp_path, tmp_path / "new", tmp_path / "new" / "sub"]
    assert path.exists()


def test_a_failed_write_fsyncs_nothing_into_place(tmp_path, fsynced):
    def fails(tmp: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "a.json", fails)
    assert fsynced == [] and list(tmp_path.iterdir()) == []


def test_append_durable_fsyncs_the_line_and_a_new_file_s_folder(tmp_path, fsynced):
    path = tmp_path / "journal.jsonl"
    append_durable(path, '{"step": 1}')
    assert fsynced == [(path, False), (tmp_path, True)]
    fsynced.clear()
    append_durable(path, '{"step": 2}')
    assert fsynced == [(path, False)]  # the file's name is durable already
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_append_durable_creates_by_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        append_durable(tmp_path / "journal.jsonl", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "journal.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask


def test_append_durable_refuses_two_lines(tmp_path):
    with pytest.raises(ValueError, match="holds a newline"):
        append_durable(tmp_path / "journal.jsonl", "one\ntwo")
    assert not (tmp_path / "journal.jsonl").exists()


def test_concurrent_appends_stay_whole_lines(tmp_path):
    path = tmp_path / "journal.jsonl"
    lines = {f"{writer}-{i}-" + "x" * (10 * i) for writer in range(8) for i in range(0, 1500, 50)}  # up to 15 kB

    def append(writer: int) -> None:
        for line in sorted(lines):
            if line.startswith(f"{writer}-"):
                append_durable(path, line)

    threads = [threading.Thread(target=append, args=(writer,)) for writer in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    written = path.read_text().split("\n")
    assert written.pop() == "" and sorted(written) == sorted(lines)

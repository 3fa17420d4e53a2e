"""The journal of a request-file run: one JSON line appended (and fsynced) per finished request, in the output folder.

    {"id": "fox", "line": 1, "digest": "…", "outputs": ["out/fox.png"]}

Appending costs the same at the 100,000th request as at the first (rewriting a whole manifest after each line
grows quadratically), and a line that survives a crash is whole: a torn last line (the node died mid-append) is
not a finished request and is ignored. `digest` hashes what made the outputs (the request and the layout): a rerun
skips an id only when its digest matches, and makes again a request that changed under the same id. The latest
line of an id counts.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from paragen.pipelines.checkpoint import RESUMABLE_CHANGES, run_fingerprint
from paragen.pipelines.outputs import append_durable

JOURNAL = "journal"


def journal_path(out_dir: str, share: tuple[int, int]) -> Path:
    """The journal of the requests of `share` (task, tasks of a job array) in `out_dir`."""
    task, tasks = share
    return Path(out_dir) / (f"{JOURNAL}.jsonl" if tasks == 1 else f"{JOURNAL}-{task}-of-{tasks}.jsonl")


def request_digest(request: Any, layout: dict) -> str:
    """A hash of what makes a request's outputs: its fields (less where they go) and the layout."""
    fingerprint = run_fingerprint(asdict(request), layout, RESUMABLE_CHANGES)
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_journal(path: Path) -> dict[str, dict]:
    """What the journal at `path` records as done: id -> its latest entry (empty without a journal). ValueError
    for a file that is not a paragen journal."""
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read as a paragen journal ({error}); move it away or pick another --out")
    done: dict[str, dict] = {}
    whole = text.split("\n")[:-1]  # what follows the last newline is a torn append (or nothing)
    for number, line in enumerate(whole, start=1):
        try:
            entry = json.loads(line)
            done[entry["id"]] = {"line": entry["line"], "digest": entry["digest"], "outputs": entry["outputs"]}
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{number} is not a paragen journal entry; move the file away or pick another "
                             "--out") from None
    return done


def record(path: Path, request_id: str, line: int, digest: str, outputs: list[str]) -> None:
    """Append a finished request to the journal at `path`, durably."""
    entry = {"id": request_id, "line": line, "digest": digest, "outputs": outputs}
    append_durable(path, json.dumps(entry, sort_keys=True, allow_nan=False))


__all__ = ["JOURNAL", "journal_path", "read_journal", "record", "request_digest"]

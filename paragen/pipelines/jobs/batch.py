"""Running a prepared job: one request, or a request file — many requests per launch, the model loaded once.

`--requests FILE.jsonl`: each non-blank line is a JSON object holding the request fields a line may set (the job's
request schema, `schema.PER_REQUEST`, with their declared types and bounds, parsed strictly) and optionally an
`id` naming the request's outputs (default `line-N`; unique over the whole file; paragen's own names are refused).
The command line gives the other fields.

Ranks agree by construction. The output rank reads the file and checks every line against the schema; every rank
follows that plan (broadcast). Every rank reads the output folder's journal and the ranks compare what they read:
ranks that see different journals (an `--out` that is not one folder shared by every node, after a requeue onto
other nodes) stop with an error before anything is made. Each line's checks that depend on a rank's own state
(its free memory, its output folder) run on every rank and the verdicts are gathered before the line's first
collective: one rank's refusal is every rank's (`agree`).

A refused line is reported with its line number and skipped (`--strict`: the run stops). Each finished request is
appended to the journal (`journal.jsonl` in the output folder, fsynced) with a digest of its request and layout: a
rerun after a kill or a requeue skips the lines whose id and digest are recorded, and makes again a line whose
request changed under the same id. Task k of a SLURM job array of n tasks takes the lines k, k + n, k + 2n, … and
keeps its own journal (`journal-k-of-n.jsonl`).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from paragen.comms import GroupComm, broadcast_object, is_output_rank, world_comm
from paragen.log import get_logger
from paragen.pipelines.jobs import schema
from paragen.pipelines.jobs.agree import (REFUSED, RequestFailed, RequestRefused, Verdict, agreed, attempt,
                                          same_everywhere, settle)
from paragen.pipelines.jobs.journal import journal_path, read_journal, record, request_digest

SHARED_OUT = ": --out must be one folder that every rank sees alike (shared storage)"


class LineFields(schema.Strict):
    """What a request-file line may hold besides its request fields."""

    id: str | None = None


@dataclass(frozen=True)
class RequestFile:
    """The `--requests` option: the file, whether a refused line stops the run, and this job's share of it."""

    path: str
    strict: bool
    share: tuple[int, int] = (0, 1)  # (task, tasks) of a SLURM job array


def request_file(args, launch) -> RequestFile | None:
    """The request file of a job's arguments (None without one); `launch` says the array share."""
    if args.requests is None:
        return None
    return RequestFile(args.requests, args.strict, (launch.array_task, launch.array_tasks))


@dataclass(frozen=True)
class Line:
    """One request of a request file."""

    number: int  # 1-based line of the file
    id: str  # names its outputs
    request: Any  # the job's request: the command line's with the line's fields
    digest: str  # what makes its outputs (`journal.request_digest`)


@dataclass(frozen=True)
class Plan:
    """A request file's share for this job, as every rank follows it."""

    lines: list[Line]
    refused: list[str]  # lines the schema refused, as messages
    journal: Path
    done: dict[str, dict]  # what the journal records: id -> entry


def read_requests(source: RequestFile, base: Any, layout: dict) -> tuple[list[Line], list[str]]:
    """The requests of `source`'s share, each `base` with its line's fields, and the refused lines as messages
    (`source.strict`: ValueError at the first). `layout` goes into each line's digest."""
    try:
        text = Path(source.path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--requests {source.path!r} cannot be read: {getattr(error, 'strerror', None) or error}")
    numbered = [(number, raw) for number, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
    if not numbered:
        raise ValueError(f"--requests {source.path!r} holds no request")
    parsed = _parse_all(numbered, type(base))
    task, tasks = source.share
    lines, refused = [], []
    for number, _ in numbered[task::tasks]:
        outcome = parsed[number]
        try:
            if isinstance(outcome, ValueError):
                raise outcome
            request_id, fields = outcome
            request = schema.replace(base, **fields, name=request_id)
        except ValueError as error:
            message = f"{source.path}:{number}: {error}"
            if source.strict:
                raise ValueError(message) from None
            refused.append(message)
            continue
        lines.append(Line(number, request_id, request, request_digest(request, layout)))
    return lines, refused


def _parse_all(numbered: list[tuple[int, str]], request_class: type) -> dict[int, Any]:
    """Every line's (id, fields), or the ValueError that refuses it; ids are unique over the whole file, so that
    the shares of a job array cannot name two requests alike."""
    model = schema.fields_model(request_class, schema.PER_REQUEST, LineFields)
    first_line: dict[str, int] = {}
    parsed: dict[int, Any] = {}
    for number, raw in numbered:
        try:
            fields = schema.parse_fields(model, raw, request_class)
            request_id = schema.check_id(fields.id or f"line-{number}")
            if request_id in first_line:
                raise ValueError(f"id {request_id!r} is used by an earlier line ({first_line[request_id]})")
        except ValueError as error:
            parsed[number] = error
            continue
        first_line[request_id] = number
        parsed[number] = (request_id, schema.given(fields, ("id",)))
    return parsed


def open_plan(source: RequestFile, base: Any, layout: dict, comm: GroupComm) -> Plan:
    """The plan every rank follows: the output rank's reading of the file (broadcast), and the journal, which every
    rank reads and the ranks compare."""
    reading = attempt(lambda _: read_requests(source, base, layout), None) if is_output_rank() else None
    found, verdict = broadcast_object(comm, reading)
    if verdict is not None:
        raise (RequestRefused if verdict[0] == REFUSED else RequestFailed)(verdict[1])
    lines, refused = found
    path = journal_path(base.out_dir, source.share)
    done = agreed(comm, read_journal, path)
    summary = hashlib.sha256(json.dumps(done, sort_keys=True).encode()).hexdigest()[:12]
    same_everywhere(comm, f"journals at {path}", f"{len(done)} done, digest {summary}", SHARED_OUT)
    return Plan(lines, refused, path, done)


def run_batch(plan: Plan, check: Callable[[Any], Any], generate: Callable[[Any], dict | None], strict: bool,
              comm: GroupComm) -> None:
    """Make every line of `plan` its journal does not record with the same digest — `check` (agreed on every rank,
    see `checked`), then `generate`, agreed — appending each to the journal as it finishes; then log a summary."""
    log = get_logger()
    refused, made, before = list(plan.refused), 0, 0
    for line in plan.lines:
        entry = plan.done.get(line.id)
        if entry is not None and entry["digest"] == line.digest:
            before += 1
            continue
        if entry is not None:
            log.info("line %d (%s): its request changed since it was made; making it again", line.number, line.id)
        try:
            agreed(comm, lambda item, line=line: _make_and_record(plan.journal, line, generate, item),
                   check(line.request))
        except RequestRefused as error:
            message = f"line {line.number} ({line.id}): {error}"
            if strict:
                raise RequestRefused(message) from None
            refused.append(message)
            continue
        made += 1
    if is_output_rank():
        log.info("requests: %d made, %d done before, %d refused", made, before, len(refused))
        for message in refused:
            log.warning("refused: %s", message)


def _make_and_record(journal: Path, line: Line, generate: Callable[[Any], dict | None], item: Any) -> None:
    """Make a line's request; the output rank appends it to the journal (a failure there is every rank's)."""
    report = generate(item)
    if is_output_rank():
        record(journal, line.id, line.number, line.digest, [report[key] for key in ("image", "video") if key in report])


def checked(comm: GroupComm, job: Any, request: Any) -> Any:
    """`job.check(request)` on every rank, agreed; where the job says what its item computes on (`content`: token
    ids a rank read from its own files), the ranks compare that too."""
    item = agreed(comm, job.check, request)
    _same_content(comm, job, item)
    return item


def _same_content(comm: GroupComm, job: Any, item: Any) -> None:
    if job.content is not None:
        same_everywhere(comm, "request contents", job.content(item), " (a prompt file that differs between nodes?)")


def agree_prepared(comm: GroupComm, job: Any, verdict: Verdict) -> None:
    """After the process group exists: every rank's verdict on its `prepare`, agreed (one rank's refusal is every
    rank's, before anything is loaded), and the single request's contents compared."""
    settle(comm, verdict)
    same_everywhere(comm, "layout", job.layout(), " (--layout auto planned differently: do the ranks see different "
                    "devices?)")
    if job.item is not None:
        _same_content(comm, job, job.item)


def run_job(module: Any, job: Any) -> dict | None:
    """Run a prepared job of a job `module` (`load`, then `generate` for its one request, returning the report,
    or for every request of its file, planned before the model is loaded)."""
    comm = world_comm()
    plan = None if job.batch is None else open_plan(job.batch, job.request, job.layout(), comm)
    start = time.perf_counter()
    state = module.load(job)
    load_s = time.perf_counter() - start
    if plan is None:
        return module.generate(job, state, job.item, load_s)
    run_batch(plan, lambda request: checked(comm, job, request), lambda item: module.generate(job, state, item, load_s),
              job.batch.strict, comm)
    return None

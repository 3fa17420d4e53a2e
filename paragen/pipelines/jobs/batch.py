"""Request files: many requests per launch, the model loaded and parallelised once.

`--requests FILE.jsonl`: each non-blank line is a JSON object holding one request's fields (the command line
gives the defaults) and optionally an `id`, which names the request's outputs (default: `line-N`). A line that
cannot be read, or that a request or a pre-init check refuses, is reported with its line number and skipped;
a request that the pipeline refuses at its call (on every rank alike, before any collective) likewise; with
`--strict` the first such line stops the run instead. The output rank records every finished request in
`manifest.json` of the output folder, rewritten atomically after each one, so a rerun after a kill or a
requeue skips what is done. Task k of a SLURM job array of n tasks takes the lines k, k + n, k + 2n, … of the
file and keeps its own manifest (`manifest-k-of-n.json`).
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from paragen.comms import is_output_rank
from paragen.log import get_logger
from paragen.pipelines.outputs import save_json

MANIFEST = "manifest.json"
# Request fields that stay those of the launch: the pipeline is loaded and parallelised once for all lines.
LAUNCH_FIELDS = ("model", "draft", "dtype", "allow_pickle", "allow_remote_code", "out_dir", "name", "checkpoint_dir",
                 "checkpoint_every", "resume")
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a request id: it names output files
_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True)
class Line:
    """One request of a request file."""

    number: int  # 1-based line of the file
    id: str  # names its outputs
    request: Any  # as the job's `prepare` returned it


@dataclass
class Batch:
    """A request file's share for this job: the requests to make, the lines refused, where finished ones are
    recorded, and whether a refusal stops the run."""

    lines: list[Line]
    refused: list[str]
    manifest: Path
    strict: bool


def open_batch(args, launch, base: Any, prepare: Callable[[Any], Any]) -> Batch | None:
    """The `--requests` file of a job's arguments (None without one), read before the process group: `base` is the
    command line's request, `prepare` the job's pre-init checks of one request; `launch` says the array share."""
    if args.requests is None:
        return None
    share = (launch.array_task, launch.array_tasks)
    lines, refused = read_requests(args.requests, base, prepare, args.strict, share)
    return Batch(lines, refused, manifest_path(base.out_dir, share), args.strict)


def read_requests(path: str, base: Any, prepare: Callable[[Any], Any], strict: bool,
                  share: tuple[int, int] = (0, 1)) -> tuple[list[Line], list[str]]:
    """The requests of the JSONL file `path`, each `base` with the line's fields, as `prepare` returns them (the
    job's pre-init checks, and what it needs to run the request); and the refused lines, as messages.
    `strict`: ValueError at the first refused line. `share` (task, tasks): only every tasks-th request line,
    from the task-th (a job array's task)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"--requests {path!r} cannot be read: {error.strerror or error}") from None
    allowed = {f.name for f in dataclasses.fields(base)} - set(LAUNCH_FIELDS)
    lines, refused, seen = [], [], set()
    numbered = [(number, raw) for number, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
    task, tasks = share
    for number, raw in numbered[task::tasks]:
        try:
            line = _parse(number, raw, base, allowed, seen)
            line = dataclasses.replace(line, request=prepare(line.request))
        except (ValueError, TypeError) as error:
            message = f"{path}:{number}: {error}"
            if strict:
                raise ValueError(message) from None
            refused.append(message)
            continue
        seen.add(line.id)
        lines.append(line)
    if not lines and not refused:
        raise ValueError(f"--requests {path!r} holds no request")
    return lines, refused


def _parse(number: int, raw: str, base: Any, allowed: set[str], seen: set[str]) -> Line:
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(fields, dict):
        raise ValueError("a request is a JSON object")
    name = str(fields.pop("id", f"line-{number}"))
    if not _ID.fullmatch(name):
        raise ValueError(f"id {name!r} must be 1-128 letters, digits, '.', '_' or '-' (it names the outputs)")
    if name in seen:
        raise ValueError(f"id {name!r} is used by an earlier line")
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"unknown or launch-wide fields {', '.join(unknown)} (a line may set: {', '.join(sorted(allowed))})")
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()}
    return Line(number, name, dataclasses.replace(base, **values, name=name))


def manifest_path(out_dir: str, share: tuple[int, int]) -> Path:
    """The manifest of the requests of `share` (task, tasks) in `out_dir`."""
    task, tasks = share
    return Path(out_dir) / (MANIFEST if tasks == 1 else f"manifest-{task}-of-{tasks}.json")


def manifest(path: Path) -> dict[str, dict]:
    """What the manifest at `path` records as done: id -> its line and outputs (empty without a manifest)."""
    if not path.exists():
        return {}
    try:
        done = json.loads(path.read_text(encoding="utf-8"))["done"]
        if isinstance(done, dict):
            return done
    except (ValueError, KeyError, TypeError):
        pass
    raise ValueError(f"{path} is not a paragen request manifest; move it away or pick another --out")


def run_job(module: Any, job: Any) -> dict | None:
    """Run a prepared job of a job `module` (`load`, then `generate` for its one request, returning the report,
    or for every request of its file)."""
    start = time.perf_counter()
    state = module.load(job)
    load_s = time.perf_counter() - start
    if job.batch is None:
        return module.generate(job, state, job.item, load_s)
    run_batch(job.batch, lambda item: module.generate(job, state, item, load_s))
    return None


def run_batch(batch: Batch, generate: Callable[[Any], dict | None]) -> None:
    """Generate every line not yet in the batch's manifest, recording each as it finishes; then log a summary. A
    line the pipeline refuses (ValueError/TypeError, raised alike on every rank before any collective) is skipped."""
    log = get_logger()
    lines, refused, strict = batch.lines, batch.refused, batch.strict
    done = manifest(batch.manifest)
    before, made = sum(line.id in done for line in lines), 0
    for line in lines:
        if line.id in done:
            continue
        try:
            report = generate(line.request)
        except (ValueError, TypeError) as error:
            if strict:
                raise ValueError(f"line {line.number} ({line.id}): {error}") from None
            refused.append(f"line {line.number} ({line.id}): {error}")
            continue
        made += 1
        if is_output_rank():
            outputs = [report[key] for key in ("image", "video") if key in report]
            done[line.id] = {"line": line.number, "outputs": outputs}
            save_json({"done": done}, batch.manifest)
    log.info("requests: %d made, %d done before, %d refused", made, before, len(refused))
    for message in refused:
        log.warning("refused: %s", message)

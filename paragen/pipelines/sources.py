"""Where a model's files come from: a local folder, or a Hugging Face Hub id (`org/name`, `org/name@revision`) resolved
into the local hub cache by `huggingface_hub`. (Embedded names are the loaders' own: `loading`, `llm.loading`.)

A hub id is fetched once, in the job's checks before anything is built (`fetch`): every rank asks `huggingface_hub`
for the snapshot, and the cache's per-file locks make one process download each file while the others on that cache
wait for it and then read it. `HF_HUB_CACHE`, `HF_HOME` and `HF_HUB_OFFLINE` are huggingface_hub's own; offline, or
when the hub cannot be reached, a snapshot missing from the cache is a clear error at once. Pickle weights (`*.bin`,
`*.pt`, …) are not downloaded unless allowed. After `fetch`, `folder` finds the snapshot in the cache without the
network. A path that exists is always a local folder, even when it looks like an id.
"""
from __future__ import annotations

import re
from pathlib import Path

SAFE_WEIGHTS = "*.safetensors"
PICKLE_WEIGHTS = ("*.bin", "*.ckpt", "*.pt", "*.pth")
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w][\w./-]*))?$")


class ModelLoadError(ValueError):
    """The model source cannot be loaded; the message says why and what to do."""


def hub_id(model: str) -> tuple[str, str | None] | None:
    """(repository, revision or None) when `model` names a hub repository, not an existing path; else None."""
    if Path(model).exists():
        return None
    match = _HUB_ID.match(model)
    return (match["repo"], match["revision"]) if match else None


def display_name(model: str) -> str:
    """A name for `model` fit for a file name: a folder's name, a hub id's repository name, else `model`."""
    found = hub_id(model)
    if found is not None:
        return found[0].split("/")[1] + (f"@{found[1].replace('/', '-')}" if found[1] else "")
    return Path(model).name if Path(model).exists() else model


def _snapshot(model: str, *, download: bool, allow_pickle: bool) -> Path:
    from huggingface_hub import constants, errors, snapshot_download

    repo, revision = hub_id(model)
    offline = constants.HF_HUB_OFFLINE
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=offline or not download,
                                      ignore_patterns=None if allow_pickle else list(PICKLE_WEIGHTS)))
    except errors.LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if offline else "it was not fetched" if not download
               else "the hub could not be reached")
        raise ModelLoadError(f"model {model!r}: hub repository {repo}{'@' + revision if revision else ''} is not in "
                             f"{where}, and {why}; download it where the hub is reachable "
                             f"(hf download {repo}{' --revision ' + revision if revision else ''}) into the cache "
                             "every rank reads (HF_HUB_CACHE), or give a local folder") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as error:
        raise ModelLoadError(f"model {model!r}: hub repository {repo} cannot be read ({type(error).__name__}: it does "
                             "not exist, is private, or is gated; log in with `hf auth login` if you have access)"
                             ) from None
    except errors.RevisionNotFoundError:
        raise ModelLoadError(f"model {model!r}: hub repository {repo} has no revision {revision!r}") from None
    except (errors.HfHubHTTPError, OSError) as error:
        raise ModelLoadError(f"model {model!r}: fetching {repo} from the hub failed ({type(error).__name__}: "
                             f"{error})") from None


def fetch(model: str, *, allow_pickle: bool = False) -> Path:
    """The local folder of a hub id, downloaded into the hub cache if it is not there (and the hub is reachable)."""
    return _snapshot(model, download=True, allow_pickle=allow_pickle)


def folder(model: str) -> Path:
    """The local folder of a hub id already fetched, or the path `model`."""
    return _snapshot(model, download=False, allow_pickle=True) if hub_id(model) is not None else Path(model)


__all__ = ["ModelLoadError", "PICKLE_WEIGHTS", "SAFE_WEIGHTS", "display_name", "fetch", "folder", "hub_id"]

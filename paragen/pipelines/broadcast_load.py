"""Loading a local checkpoint (or a fetched hub snapshot) once for all ranks, when its weights are not sharded: the
output rank reads it (`from_pretrained`), the other ranks build the same components empty and receive every weight
by broadcast. N ranks then read the files once instead of N times at once (from shared storage, the slow part of
starting a large job), and every rank gets exactly the output rank's weights, dtypes included.

A failure to read the checkpoint on the output rank is sent to the others in place of the weights, and a failure
to build a component on another rank is gathered before any weight is sent, so every rank stops with an error
instead of waiting in a collective.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from paragen.comms import all_gather_objects, broadcast_object, world_comm
from paragen.pipelines.loading import LOADED, build_empty, tie_weights

LABEL = "load.weights"


def _tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A component's parameters (each once, tied ones under their first name) and buffers, in module order."""
    return [*module.named_parameters(), *module.named_buffers()]


def _empty(folder: Path, spec: tuple[str, str], layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
           device: torch.device) -> torch.nn.Module:
    """The component in `folder`, built with empty weights (and buffers) of the output rank's dtypes on `device`."""
    module = build_empty(spec[0], spec[1], folder, buffers=True)  # the buffers are received too
    dtypes = {name: dtype for name, dtype, _ in layout}
    for name, tensor in module.named_parameters(remove_duplicate=False):
        tensor.data = tensor.data.to("meta", dtypes.get(name, tensor.dtype))
    for name, tensor in module.named_buffers():
        tensor.data = tensor.data.to("meta", dtypes[name])
    tie_weights(module.to_empty(device=device))  # tied as the output rank's, so that the names match
    received = [(name, t.dtype, tuple(t.shape)) for name, t in _tensors(module)]
    if received != layout:
        raise RuntimeError(f"{folder} builds other weights here than on the output rank (a different library "
                           "version on this rank?)")
    return module.eval()


def load_once(root: Path, components: dict[str, tuple[str, str] | None], device: torch.device,
              read: Callable[..., Any]) -> Any:
    """The pipeline in `root` on every rank: `read(**parts)` (`from_pretrained` of the folder) on the output rank; on
    the others `read` with every weighted component built empty, then filled from the output rank's."""
    comm = world_comm()
    if comm.rank == 0:
        try:
            pipe = read()
            modules = {name: part for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
            for part in modules.values():
                torch.nn.Module.to(part, device)
            layout = {name: [(key, t.dtype, tuple(t.shape)) for key, t in _tensors(part)]
                      for name, part in modules.items()}
            broadcast_object(comm, ("ok", layout))
        except Exception as error:  # noqa: BLE001 - every rank must learn that the read failed
            broadcast_object(comm, ("error", f"{type(error).__name__}: {error}"))
            raise
    else:
        status, layout = broadcast_object(comm, None)
        if status == "error":
            raise RuntimeError(f"the output rank could not read {root}: {layout}")
    problem = None
    if comm.rank != 0:
        try:
            modules = {name: _empty(root / name, components[name], parts, device) for name, parts in layout.items()}
            pipe = read(**modules)
        except Exception as error:  # noqa: BLE001 - gathered below, so that no rank waits for weights
            problem = f"rank {comm.rank}: {type(error).__name__}: {error}"
    problems = [p for p in all_gather_objects(comm, problem) if p]
    if problems:
        raise RuntimeError(f"loading {root} failed: {'; '.join(problems)}")
    with torch.no_grad():
        for name in sorted(layout):
            for _, tensor in _tensors(modules[name]):
                comm.broadcast_async(tensor.data, 0, LABEL).wait()
            setattr(modules[name], LOADED, "read, sent" if comm.rank == 0 else "received")
    return pipe


__all__ = ["load_once"]

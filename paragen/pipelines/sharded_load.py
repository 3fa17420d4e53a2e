"""Loading a local checkpoint's denoisers and text encoders with their weights sharded: each rank reads only the
rows of every weight it keeps.

A component is built from its config with its parameters on torch's `meta` device (its buffers, such as rotary
tables computed at construction, built for real), sharded (`parallel.weights`), given memory for this rank's shards
only, and filled from the safetensors files by reading each rank's rows (`safetensors_rows`), so no rank ever holds
a whole copy of a sharded component, and the ranks read the checkpoint once between them.

The weights are cast to the request's dtype as they are read, except those the model keeps in float32
(`_keep_in_fp32_modules`), as `from_pretrained` does; buffers the checkpoint does not hold (rotary tables) keep the
dtype they were built in. A component whose checkpoint names do not match its parameters
one for one (a checkpoint in an older layout that `from_pretrained` converts) is loaded whole instead and sharded
after, with a warning: the same weights, without the saving in load time.
"""
from __future__ import annotations

from pathlib import Path

import torch

from paragen.comms.weight_shards import local_rows
from paragen.log import warn_once
from paragen.parallel.weights import SHARDED_COMPONENTS, shard_component
from paragen.pipelines.loading import LOADED, SAFE_WEIGHTS, build_empty
from paragen.pipelines.safetensors_rows import index_folder, read_rows


def _float32_modules(module: torch.nn.Module, library: str, dtype: torch.dtype) -> set[str]:
    """The names of the modules whose weights `from_pretrained` keeps in float32 at `dtype`: diffusers' model's
    `_keep_in_fp32_modules` at any dtype; a transformers model's at float16, its `_strict` ones at float16 and
    bfloat16."""
    if library != "transformers":
        return set(getattr(module, "_keep_in_fp32_modules", None) or ())
    keep = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ()) if dtype in (
        torch.float16, torch.bfloat16) else set()
    return keep | (set(getattr(module, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set())


def load_sharded_component(folder: Path, library: str, class_name: str, dtype: torch.dtype, device: torch.device,
                           host_copies: bool = False) -> torch.nn.Module | None:
    """The component in `folder` with its weights sharded over the ranks and read by slices onto `device` (or into
    host memory, `host_copies`); None where its checkpoint does not name its parameters one for one (load it whole,
    then shard it)."""
    module = build_empty(library, class_name, folder, buffers=False)
    stored = index_folder(folder, SAFE_WEIGHTS)
    tied: dict[int, list[str]] = {}  # a parameter -> every name it has (tied weights have several)
    for name, parameter in module.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    stored_as = {name: next((a for a in aliases if a in stored), None) for aliases in tied.values() for name in aliases}
    missing = [name for name, key in stored_as.items() if key is None]
    if missing:
        warn_once(f"{folder}: {len(missing)} weights (such as {missing[0]}) are not named as the model names them; "
                  "loading it whole, then sharding it")
        return None
    float32 = _float32_modules(module, library, dtype)

    def cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
        kept = any(part in name.split(".") for part in float32)
        return tensor.to(torch.float32 if kept else dtype) if tensor.is_floating_point() else tensor

    for name, parameter in module.named_parameters():
        parameter.data = cast(name, parameter.data)
    for name, buffer in module.named_buffers():
        if name in stored:  # the others keep the dtype they were built in, as from_pretrained leaves them
            buffer.data = cast(name, buffer.data)
    buffers = {name: buffer.to(device) for name, buffer in module.named_buffers()}
    shard_component(module, device, host_copies)
    module.to_empty(device="cpu" if host_copies else device)
    for name, buffer in module.named_buffers():
        buffer.data = buffers[name]
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            local, first = local_rows(parameter)
            if local.numel():
                local.copy_(read_rows(stored[stored_as[name]], first, local.shape[0] if local.dim() else None))
        for name, buffer in module.named_buffers():
            if name in stored:
                buffer.copy_(read_rows(stored[name]))
    setattr(module, LOADED, "its rows read")
    return module.eval()


def load_sharded_components(root: Path, components: dict[str, tuple[str, str] | None], dtype: torch.dtype,
                            device: torch.device, host_copies: bool = False) -> dict[str, torch.nn.Module]:
    """The sharded components (`SHARDED_COMPONENTS`) of the checkpoint in `root` that load by slices."""
    loaded = {}
    for name in SHARDED_COMPONENTS:
        spec = components.get(name)
        if spec is not None and (root / name / "config.json").is_file():
            module = load_sharded_component(root / name, spec[0], spec[1], dtype, device, host_copies)
            if module is not None:
                loaded[name] = module
    return loaded


__all__ = ["load_sharded_component", "load_sharded_components"]

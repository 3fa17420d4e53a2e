"""The `--dtype` names every workload takes, and what `auto` means on this rank's device."""
from __future__ import annotations

from typing import Literal

import torch

from paragen.comms import default_dtype, rank_device

DtypeName = Literal["auto", "float32", "float16", "bfloat16"]  # a request's `dtype`
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_HELP = ("weights and activations dtype; auto: float32 on CPU, on a GPU bfloat16 where it computes it natively, "
              "else float16")


def check_dtype(name: str) -> None:
    """Refuse a dtype name paragen does not know."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The torch dtype `name` means on `device` (default: this rank's device, chosen by `paragen.init()`)."""
    check_dtype(name)
    return DTYPES[name] or default_dtype(device or rank_device())


__all__ = ["DtypeName", "DTYPES", "DTYPE_HELP", "check_dtype", "resolve_dtype"]

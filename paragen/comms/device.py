"""The device this rank computes on: chosen once by `paragen.init()`, read by every layer above.

| request  | CUDA present                   | no CUDA                          |
|----------|--------------------------------|----------------------------------|
| `auto`   | `cuda:LOCAL_RANK`              | `cpu`                            |
| `cuda`   | `cuda:LOCAL_RANK`              | an error, on every rank, at once |
| `cuda:N` | `cuda:N` (ranks may share one) | an error                         |
| `cpu`    | `cpu`                          | `cpu`                            |
"""
from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cuda", "cpu")

_rank_device = torch.device("cpu")


def resolve_device(requested: str | torch.device, local_rank: int) -> torch.device:
    """The device `requested` (see the table) means for the rank with this `local_rank`."""
    text = str(requested)
    if text == "cpu":
        return torch.device("cpu")
    if text not in ("auto", "cuda") and not text.startswith("cuda:"):
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)} (or cuda:N), got {text!r}")
    if not torch.cuda.is_available():
        if text == "auto":
            return torch.device("cpu")
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"--device {text}: no CUDA device is visible to this process (torch {torch.__version__}, "
                         f"{build}); use --device cpu or auto")
    count = torch.cuda.device_count()
    index = int(text.split(":", 1)[1]) if ":" in text else local_rank
    if not 0 <= index < count:
        raise ValueError(f"cuda:{index} does not exist: this node has {count} CUDA device(s); start at most {count} "
                         "ranks per node (one per GPU)")
    return torch.device("cuda", index)


def set_rank_device(device: torch.device) -> None:
    """Make `device` this rank's device (and the current CUDA device, for libraries that use it)."""
    global _rank_device
    _rank_device = torch.device(device)
    if _rank_device.type == "cuda":
        torch.cuda.set_device(_rank_device)


def rank_device() -> torch.device:
    """The device this rank computes on (`cpu` until `paragen.init()` chose another)."""
    return _rank_device


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype a model runs in when none is asked for: float32 on CPU; on a GPU bfloat16 where the GPU computes
    it natively (Ampere and later), float16 before."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def check_model_device(device: torch.device, backend: str | None) -> None:
    """Refuse a model that is not where this rank computes: NCCL moves only CUDA tensors, and a model on another
    rank's GPU would put two ranks on one device."""
    device = torch.device(device)
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the model is on {device} but the process group uses NCCL, which moves CUDA tensors only: "
                         f"move it with .to(paragen.rank_device()) ({rank_device()}) before parallelising")
    if device.type == "cuda" and rank_device().type == "cuda" and device != rank_device():
        raise ValueError(f"the model is on {device} but this rank computes on {rank_device()}: move it with "
                         ".to(paragen.rank_device()) before parallelising")

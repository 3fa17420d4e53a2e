"""Device profiles: what one rank computes per second by kernel class, what a kernel launch costs, its memory,
and the links between ranks. GPU profiles are published specifications times the fraction large kernels
achieve (sources in `bench/published/devices.md`); the CPU profile is measured on the machine at hand
(`calibrate`, `bench/calibrate_cost.py`) and shipped as `profiles/cpu.json`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PROFILE_DIR = Path(__file__).parent / "profiles"
GIB = 1 << 30


@dataclass(frozen=True)
class Link:
    """A connection class between two ranks: achieved bytes per second per rank and direction, seconds per
    message."""

    name: str
    bandwidth: float
    latency: float


@dataclass(frozen=True)
class DeviceProfile:
    """One rank's device. `rates`: achieved FLOP/s of matmul, conv and attention kernels; `memory_bandwidth`:
    achieved bytes/s of memory-bound kernels; `kernel_s`: what each kernel launch adds (dispatch, launch); `cores`:
    compute units ranks share (the CPU's cores; 0: one device per rank); `contention`: how much slower a CPU rank
    computes while other ranks compute beside it on the same host (shared caches and memory; measured)."""

    name: str
    rates: dict[str, float]
    memory_bandwidth: float
    kernel_s: float
    memory_bytes: int
    gpus_per_node: int
    intra: Link
    inter: Link
    cores: int = 0
    contention: float = 1.0
    source: str = ""
    fit: dict = field(default_factory=dict)  # the calibration's inputs and residuals, where measured

    def room(self, ranks_per_node: int) -> int:
        """Memory one rank may use: a GPU's own; the host's shared by the ranks on it (CPU)."""
        return self.memory_bytes // ranks_per_node if self.cores else self.memory_bytes

    def slowdown(self, ranks_per_node: int, threads: int) -> float:
        """How much slower each rank runs than the profile says when `ranks_per_node` ranks share the node (CPU:
        `threads` each; the profile's rates are per thread)."""
        if not self.cores:
            return 1.0
        return max(1.0, ranks_per_node * threads / self.cores) * (self.contention if ranks_per_node > 1 else 1.0)


def _gpu(name: str, tflops: float, matmul: float, conv: float, attention: float, bandwidth_tbs: float, memory_gb: int,
         intra: Link, inter: Link, source: str, kernel_s: float = 6e-6) -> DeviceProfile:
    peak = tflops * 1e12
    return DeviceProfile(name, {"matmul": peak * matmul, "conv": peak * conv, "attention": peak * attention},
                         bandwidth_tbs * 1e12 * 0.8, kernel_s, memory_gb * 10 ** 9, 8, intra, inter, source=source)


# Dense BF16 tensor throughput (FP32 accumulate), memory bandwidth and size, NVLink/PCIe per direction, InfiniBand
# per GPU: the vendors' datasheets. Achieved fractions: large cuBLAS GEMMs ~70–80 % of peak, cuDNN convolutions
# ~50 %, FlashAttention-2 forward ~35 % (H100) and ~65 % (A100) of peak, NCCL ~80 % of link bandwidth, memory-bound
# kernels 80 % of HBM bandwidth (`bench/published/devices.md` gives the sources).
GPUS = {
    "h100": _gpu("h100", 989, 0.70, 0.50, 0.35, 3.35, 80, Link("nvlink4", 450e9 * 0.8, 10e-6),
                 Link("ib-ndr", 50e9 * 0.8, 20e-6), "H100 SXM5 80GB, NVLink 4 (450 GB/s per direction), NDR 400 Gb/s"),
    "a100": _gpu("a100", 312, 0.75, 0.50, 0.65, 2.039, 80, Link("nvlink3", 300e9 * 0.8, 10e-6),
                 Link("ib-hdr", 25e9 * 0.8, 20e-6), "A100 SXM4 80GB, NVLink 3 (300 GB/s per direction), HDR 200 Gb/s"),
    "l40": _gpu("l40", 181, 0.70, 0.50, 0.50, 0.864, 48, Link("pcie4", 32e9 * 0.7, 15e-6),
                Link("eth-100g", 12.5e9 * 0.8, 30e-6), "L40 48GB, PCIe 4.0 x16, no NVLink; 100 Gb/s between nodes"),
    "4090": _gpu("4090", 165.2, 0.70, 0.50, 0.50, 1.008, 24, Link("pcie4-host", 32e9 * 0.4, 20e-6),
                 Link("eth-100g", 12.5e9 * 0.8, 30e-6), "RTX 4090 24GB, PCIe 4.0 x16 without peer-to-peer (through "
                 "host memory); 100 Gb/s between nodes"),
}
DEVICES = (*GPUS, "cpu")


def load_profile(path: Path) -> DeviceProfile:
    """A profile written by `save_profile` (`calibrate`'s result)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    data["intra"], data["inter"] = Link(**data["intra"]), Link(**data["inter"])
    return DeviceProfile(**data)


def save_profile(profile: DeviceProfile, path: Path) -> None:
    """Write `profile` as JSON."""
    Path(path).write_text(json.dumps(asdict(profile), indent=1) + "\n", encoding="utf-8")


def profile(name: str, path: Path | None = None) -> DeviceProfile:
    """The profile of `name` (`DEVICES`), or the one saved at `path`; the CPU's is the calibration shipped in
    `profiles/cpu.json`."""
    if path is not None:
        return load_profile(path)
    if name == "cpu":
        return load_profile(PROFILE_DIR / "cpu.json")
    if name not in GPUS:
        raise ValueError(f"unknown device {name!r}: one of {', '.join(DEVICES)}")
    return GPUS[name]


def device_of(device: torch.device) -> str:
    """The profile name of the device a job runs on: its GPU's model, else `cpu`; ValueError for a GPU without a
    profile."""
    if device.type != "cuda":
        return "cpu"
    label = torch.cuda.get_device_name(device).lower()
    for name in GPUS:
        if name in label:
            return name
    raise ValueError(f"no cost profile for {label!r} (profiles: {', '.join(GPUS)}); give the layout's degrees "
                     "instead of --layout auto")

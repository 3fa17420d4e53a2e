"""The cost of one request under one layout: step time, memory per rank and bytes per step, predicted from the
traced kernels of the model (`trace`), a device profile (`devices`) and the exchanges' bytes (`exchange`).

Time of a kernel on a rank: its share of the FLOPs over the profile's rate for its class (matmul, conv, attention),
or of the bytes it moves over the memory bandwidth where that takes longer (the roofline: a decode step's
matrix-vector products), plus the launch cost — which no split divides. A message costs its latency per call plus
its bytes over the link's bandwidth (the slower link where its group spans nodes). What each mode hides:
- every message's per-call latency: nothing (starting it and waiting for it are on the rank's path);
- sync exchanges (conv halos, GroupNorm statistics, Ulysses' all-to-alls, the output gather): nothing;
- displaced and partial: the stale exchange's transfer runs behind the step's compute (exposed only where longer);
- Ring: each K/V pass's transfer behind the attention on the block in hand;
- clips: the transfer of the neighbours' halo and global K/V behind the clip's own attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from paragen.parallel.mesh import DIMS, GROUPS
from paragen.pipelines.cost.devices import DeviceProfile
from paragen.pipelines.cost.exchange import Message
from paragen.pipelines.cost.trace import Kernel, Trace

MESH_ORDER = DIMS  # `parallel.mesh`: ranks row-major over these, tp innermost (a causal LM's seq shards on ring)


@dataclass(frozen=True)
class Placement:
    """Where the ranks are: `gpus_per_node` ranks on each node, `threads` CPU threads each."""

    world: int
    gpus_per_node: int
    threads: int = 1

    @property
    def nodes(self) -> int:
        return math.ceil(self.world / self.gpus_per_node)


def kernels_time(kernels: list[Kernel], share: float, device: DeviceProfile, placement: Placement,
                 pieces: int = 1) -> float:
    """Seconds for `share` of each kernel's work on one rank, each kernel run as `pieces` launches."""
    work = launches = 0.0
    for k in kernels:
        moved = k.bytes / device.memory_bandwidth
        work += moved if k.kind == "memory" else max(k.flops / device.rates[k.kind], moved)  # the roofline
        launches += pieces
    slowdown = device.slowdown(min(placement.world, placement.gpus_per_node), placement.threads)
    threads = placement.threads if device.cores else 1  # a CPU profile's rates are one thread's
    return slowdown * (work * share / threads + launches * device.kernel_s)


def compute_time(trace: Trace, share: float, device: DeviceProfile, placement: Placement, ring: int = 1) -> tuple[
        float, float]:
    """(Seconds of one traced call on one rank doing `share` of it, seconds of its attention kernels). Ring splits
    each self-attention into `ring` launches (one per K/V block) and a merge of their outputs."""
    others = [k for k in trace.kernels if k.kind != "attention"]
    attention = [k for k in trace.kernels if k.kind == "attention"]
    attention_s = kernels_time(attention, share, device, placement, pieces=ring)
    merges = [Kernel("memory", 0.0, 2 * k.bytes) for k in attention] * (ring - 1)  # the log-sum-exp merges
    rest = kernels_time(others + merges, share, device, placement)
    return rest + attention_s, attention_s


def group_span(group: str, degrees: dict[str, int], placement: Placement) -> tuple[int, float]:
    """(Ranks in `group`, the share of a rank's peers in it that are on other nodes) for the mesh's layout."""
    dims = GROUPS[group]
    size = math.prod(degrees.get(d, 1) for d in dims)
    inner = min(MESH_ORDER.index(d) for d in dims)
    stride = math.prod(degrees.get(d, 1) for d in MESH_ORDER[inner + len(dims):]) if group != "world" else 1
    if size <= 1 or placement.nodes == 1:
        return size, 0.0
    local = max(1, min(size, placement.gpus_per_node // max(1, stride)))
    return size, (size - local) / (size - 1)


def message_time(message: Message, degrees: dict[str, int], placement: Placement, device: DeviceProfile) -> tuple[
        float, float, int, int]:
    """(Seconds of its calls' latency, seconds of its transfer, bytes within a node, bytes between nodes) of one
    step's `message` on one rank."""
    _, remote = group_span(message.group, degrees, placement)
    inter = int(message.bytes * remote)
    intra = message.bytes - inter
    link = device.inter if remote else device.intra
    slowdown = device.slowdown(min(placement.world, placement.gpus_per_node), placement.threads)
    transfer = max(intra / device.intra.bandwidth, inter / device.inter.bandwidth)
    return slowdown * message.calls * link.latency, slowdown * transfer, intra, inter


@dataclass
class StepCost:
    """One step on one rank: compute, exchanges, and what the exchanges add after overlap."""

    compute_s: float
    comm_s: float
    exposed_s: float
    bytes_intra: int
    bytes_inter: int
    calls: int = 0  # collectives this rank takes part in
    labels: dict[str, int] = field(default_factory=dict)

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s


def step_cost(compute_s: float, attention_s: float, messages: list[Message], degrees: dict[str, int],
              placement: Placement, device: DeviceProfile) -> StepCost:
    """Combine a step's compute with its messages by what each overlaps (module docstring)."""
    blocking = behind_step = behind_attention = 0.0
    intra = inter = 0
    labels: dict[str, int] = {}
    for message in messages:
        latency, transfer, a, b = message_time(message, degrees, placement, device)
        intra, inter = intra + a, inter + b
        labels[message.label] = labels.get(message.label, 0) + message.bytes
        blocking += latency  # starting a message and waiting for it are on the rank's path; its transfer overlaps
        if message.overlap == "step":
            behind_step += transfer
        elif message.overlap == "attention":
            behind_attention += transfer
        else:
            blocking += transfer
    exposed = blocking + max(0.0, behind_attention - attention_s)
    exposed += max(0.0, behind_step - (compute_s + exposed))
    return StepCost(compute_s, blocking + behind_step + behind_attention, exposed, intra, inter,
                    sum(m.calls for m in messages), labels)

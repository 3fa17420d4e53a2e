"""The cost of a long-context causal-LM request under each `seq × tp` layout (`paragen plan llm`): the prefill of a
`context`-token prompt over `seq` ring shards with `tp` weight shards each, then `new_tokens` decode steps over the
sequence-sharded KV cache, merged by log-sum-exp. Dense KV only: ShadowKV's offload and TriForce's speculation
are not modelled.

The busiest rank is the ring's last (contiguous shards: it attends to every earlier block, `parallel/llm/ring.py`).
Its prefill: the model traced on `context / seq` tokens (`trace`), its linear layers' work divided by `tp`, its
attention that of its own block (causal) plus one full block per earlier shard, each a launch, the K/V blocks
arriving behind the attention on the block in hand; two tensor-parallel all-reduces per layer (DeepSpeed AutoTP:
after the attention output and the MLP's down projection), blocking. A decode step: the model traced on one token
(its weight reads, memory-bound), plus reading this rank's KV shard, plus one all-gather per layer of every shard's
partial attention and log-sum-exp (blocking), plus the all-reduces.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from paragen.parallel import ParallelConfig
from paragen.parallel.llm.config import KVConfig
from paragen.pipelines import registry
from paragen.pipelines.cost.devices import DeviceProfile
from paragen.pipelines.cost.exchange import STATS_BYTES, Message
from paragen.pipelines.cost.model import Placement, StepCost, kernels_time, step_cost
from paragen.pipelines.cost.trace import Kernel, Trace, trace_call
from paragen.pipelines.llm.loading import llm_class, model_root
from paragen.pipelines.loading import build_empty

TP_ALL_REDUCES_PER_LAYER = 2  # DeepSpeed AutoTP: attention output and MLP down projection


@dataclass
class LLMPlan:
    """One `seq × tp` layout's prediction for the busiest rank."""

    degrees: tuple[tuple[str, int], ...]
    prefill: StepCost
    decode: StepCost
    new_tokens: int
    memory_bytes: int
    fits: bool  # within what a rank has

    @property
    def request_s(self) -> float:
        return self.prefill.step_s + self.new_tokens * self.decode.step_s

    def describe(self) -> str:
        return " × ".join(f"{name} {value}" for name, value in self.degrees if value > 1) or "one rank"

    def arguments(self) -> list[str]:
        return [f"--{name}={value}" for name, value in self.degrees]

    def as_dict(self) -> dict:
        return {"layout": self.describe(), "arguments": self.arguments(), "request_s": self.request_s,
                "fits": self.fits,
                "prefill_s": self.prefill.step_s, "decode_s_per_token": self.decode.step_s,
                "prefill_exposed_comm_s": self.prefill.exposed_s, "memory_bytes": self.memory_bytes,
                "prefill_bytes_intra": self.prefill.bytes_intra, "prefill_bytes_inter": self.prefill.bytes_inter,
                "decode_bytes_per_token": self.decode.bytes_intra + self.decode.bytes_inter}


class LLMCost:
    """A causal LM built on the `meta` device from its config, traced per prompt length (cached)."""

    def __init__(self, model: str, dtype: torch.dtype) -> None:
        self.class_name = llm_class(model)  # its config is enough: nothing is loaded
        self.model = build_empty("transformers", self.class_name, model_root(model), buffers=True).to(dtype)
        self.config = self.model.config
        self.dtype = dtype
        self.element = torch.empty((), dtype=dtype).element_size()
        c = self.config
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.kv_heads = c.num_key_value_heads or c.num_attention_heads
        self.weights = sum(p.numel() for p in self.model.parameters())

    @functools.lru_cache(maxsize=16)
    def forward(self, tokens: int) -> Trace:
        """One forward over `tokens` prompt tokens (causal attention among them), the last token's logits. The mask
        is given whole (transformers would inspect a padding mask's values, which the `meta` device has none of), so
        the trace sees full attention; causal attention does half its FLOPs."""
        ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
        mask = torch.zeros(1, 1, tokens, tokens, dtype=self.dtype, device="meta")
        trace = trace_call(self.model, {"input_ids": ids, "attention_mask": mask, "use_cache": False,
                                        "logits_to_keep": 1})
        trace.kernels = [dataclasses.replace(k, flops=k.flops / 2) if k.kind == "attention" else k
                         for k in trace.kernels]
        return trace

    def kv_bytes(self, tokens: int, tp: int) -> int:
        """One rank's keys and values of `tokens` tokens over every layer."""
        return 2 * tokens * self.config.num_hidden_layers * (self.kv_heads // tp) * self.head_dim * self.element


def llm_layouts(cost: LLMCost, world: int) -> tuple[list[tuple[tuple[str, int], ...]], list[str]]:
    """The `seq × tp` layouts the registry accepts on `world` ranks (dense KV), and why the others were refused."""
    workload = registry.find(cost.class_name, KVConfig())
    accepted, refused = [], []
    for tp in (v for v in range(1, world + 1) if world % v == 0):
        degrees = (("seq", world // tp), ("tp", tp))
        try:
            config = workload.resolve(ParallelConfig(**dict(degrees)), world)
            workload.check(cost.config, config, KVConfig())
        except (ValueError, TypeError) as error:
            refused.append(f"seq {world // tp} × tp {tp}: {error}")
            continue
        accepted.append(degrees)
    return accepted, refused


def predict_llm(cost: LLMCost, context: int, new_tokens: int, degrees: tuple[tuple[str, int], ...],
                placement: Placement, device: DeviceProfile) -> LLMPlan:
    """The busiest rank's prefill, decode step and memory under `degrees` (module docstring)."""
    seq, tp = dict(degrees)["seq"], dict(degrees)["tp"]
    shard = math.ceil(context / seq)
    layers, hidden, e = cost.config.num_hidden_layers, cost.config.hidden_size, cost.element
    shape = {"ring": seq, "tp": tp}  # the mesh puts a causal LM's sequence shards on its ring
    prefill = cost.forward(shard)
    others = [k for k in prefill.kernels if k.kind != "attention"]
    own = [k for k in prefill.kernels if k.kind == "attention"]
    # every earlier shard's block: twice the causal block's FLOPs (all of it visible), one launch each
    earlier = [Kernel("attention", 2 * k.flops, k.bytes) for k in own] * (seq - 1)
    attention_s = kernels_time(own + earlier, 1.0 / tp, device, placement)
    compute_s = kernels_time(others, 1.0 / tp, device, placement) + attention_s
    block = 2 * shard * (cost.kv_heads // tp) * cost.head_dim * e
    messages = [Message("llm_ring_kv", (seq - 1) * layers * block, (seq - 1) * layers, "ring", "attention")] \
        if seq > 1 else []
    if tp > 1:
        messages.append(Message("llm_tp_all_reduce", TP_ALL_REDUCES_PER_LAYER * layers * 2 * (tp - 1) * shard *
                                hidden * e // tp, TP_ALL_REDUCES_PER_LAYER * layers, "tp"))
    prefill_cost = step_cost(compute_s, attention_s, messages, shape, placement, device)

    step = cost.forward(1)
    kv_read = Kernel("memory", 0.0, float(cost.kv_bytes(shard, tp)))
    kv_attention = Kernel("attention", 4.0 * cost.config.num_attention_heads * cost.head_dim * shard * layers, 0.0)
    decode_s = kernels_time([k for k in step.kernels if k.kind != "attention"], 1.0 / tp, device, placement) + \
        kernels_time([kv_read, kv_attention], 1.0, device, placement)
    merge = (seq - 1) * (cost.config.num_attention_heads // tp) * (cost.head_dim + 1) * STATS_BYTES
    decode_messages = [Message("llm_decode_merge", layers * merge, layers, "ring")] if seq > 1 else []
    if tp > 1:
        decode_messages.append(Message("llm_tp_all_reduce", TP_ALL_REDUCES_PER_LAYER * layers * 2 * (tp - 1) *
                                       hidden * e // tp, TP_ALL_REDUCES_PER_LAYER * layers, "tp"))
    decode_cost = step_cost(decode_s, 0.0, decode_messages, shape, placement, device)
    activations = shard * (3 * hidden + 2 * cost.config.intermediate_size // tp) * e
    memory = cost.weights * e // tp + cost.kv_bytes(shard + new_tokens, tp) + activations
    room = device.room(min(placement.world, placement.gpus_per_node))
    return LLMPlan(degrees, prefill_cost, decode_cost, new_tokens, memory, memory <= room)


def rank_llm_plans(model: str, context: int, new_tokens: int, placement: Placement, device: DeviceProfile,
                   dtype: torch.dtype) -> tuple[list[LLMPlan], list[str]]:
    """Every legal layout of the request on `placement.world` ranks, those that fit first, fastest first, and the
    refused ones."""
    cost = llm_cost(model, dtype)
    found, refused = llm_layouts(cost, placement.world)
    plans = [predict_llm(cost, context, new_tokens, degrees, placement, device) for degrees in found]
    return sorted(plans, key=lambda plan: (not plan.fits, plan.request_s)), refused


@functools.lru_cache(maxsize=4)
def llm_cost(model: str, dtype: torch.dtype) -> LLMCost:
    """The model's traced forward (built once per model and dtype)."""
    return LLMCost(model, dtype)

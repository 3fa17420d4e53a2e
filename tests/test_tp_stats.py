"""`paragen llm --tp 2` on 2 real ranks: DeepSpeed AutoTP's all-reduces are in the JSON report's traffic.

Expected from the model's shape alone: each decoder layer all-reduces the output of its attention output
projection and of its MLP down-projection (`[1, T, hidden]` for a forward of T tokens), and the LM head
its logits, which paragen's runtime computes for the last position only (`[1, 1, vocab]`). `generate` runs
one prefill forward of the whole prompt (one sequence shard) and one forward per further new token. An
all-reduce of B bytes over 2 ranks counts 2·(2−1)/2·B = B bytes sent and as many received.

In one process: the backend's method is wrapped once however often it is metered, and an all-reduce over
a group nobody registered passes through uncounted.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from paragen.comms import CommStats, meter_inference_all_reduce
from tests.multiproc import ROOT, check_all_ok, run_ranks
from tests.test_llm_cli import LLM

CONFIG = json.loads((ROOT / "paragen/pipelines/configs/tiny-passkey/config.json").read_text())
FLOAT32 = 4
CONTEXT, NEW = 64, 4


@pytest.mark.slow
def test_tp_all_reduces_are_counted_in_the_report(tmp_path):
    check_all_ok(run_ranks([*LLM, "--tp", "2", "--context", str(CONTEXT), "--new-tokens", str(NEW),
                            "--out", str(tmp_path)], 2))
    (report,) = tmp_path.glob("*.json")
    data = json.loads(report.read_text())
    assert data["config"]["tp"] == 2 and data["config"]["seq"] == 1 and data["dtype"] == "float32"
    assert data["prompt_tokens"] == CONTEXT and len(data["new_tokens"]) == NEW

    layers, hidden, vocab = CONFIG["num_hidden_layers"], CONFIG["hidden_size"], CONFIG["vocab_size"]
    forwards = 1 + (NEW - 1)
    tokens = CONTEXT + (NEW - 1)  # through the decoder, over all forwards
    want_calls = forwards * (2 * layers + 1)
    want_bytes = 2 * layers * tokens * hidden * FLOAT32 + forwards * vocab * FLOAT32
    for rank in ("0", "1"):
        tp = data["comm_per_rank"][rank]["llm_tp_all_reduce"]
        assert tp["calls"] == want_calls, (rank, tp)
        assert tp["bytes_sent"] == tp["bytes_recv"] == want_bytes, (rank, tp)
        assert tp["wait_s"] > 0


class _Backend:
    """Stands for DeepSpeed's comm backend: `inference_all_reduce` doubles the tensor in place."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def inference_all_reduce(self, tensor, op, group=None):
        self.calls.append(group)
        return tensor.mul_(2)


def test_metering_wraps_once_and_counts_only_registered_groups():
    backend, stats = _Backend(), CommStats()
    tp_a, tp_b, other = object(), object(), object()
    meter_inference_all_reduce(backend, SimpleNamespace(group=tp_a, size=4, stats=stats), "a")
    wrapped = backend.inference_all_reduce
    meter_inference_all_reduce(backend, SimpleNamespace(group=tp_b, size=2, stats=stats), "b")
    assert backend.inference_all_reduce is wrapped
    x = torch.ones(3, 5)  # 60 bytes
    backend.inference_all_reduce(x, "sum", tp_a)
    backend.inference_all_reduce(x, "sum", tp_b)
    backend.inference_all_reduce(x, "sum", other)
    backend.inference_all_reduce(x, "sum")
    assert backend.calls == [tp_a, tp_b, other, None] and torch.equal(x, torch.full((3, 5), 16.0))
    snap = stats.snapshot()
    assert set(snap) == {"a", "b", "total"}
    assert snap["a"]["calls"] == 1 and snap["a"]["bytes_sent"] == snap["a"]["bytes_recv"] == 2 * 3 * 60 // 4
    assert snap["b"]["calls"] == 1 and snap["b"]["bytes_sent"] == snap["b"]["bytes_recv"] == 60
    assert snap["a"]["wait_s"] >= 0 and snap["b"]["wait_s"] >= 0

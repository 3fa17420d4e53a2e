"""Attention of one module through the seam on real ranks: each rank holds an uneven shard of the queries, keys and
values (and of a padding mask over the keys, as a prompt's padding); rank 0 saves every rank's output.

    seam_worker.py OUT ulysses ring

for each mask kind: none; `shared` (padding keys hidden from both batch elements); `per-sample` (and some keys
hidden from one batch element only).
"""
import sys

import torch
import torch.nn.functional as F

import paragen
from paragen.comms import all_gather_objects
from paragen.parallel import ParallelConfig, ParallelMesh
from paragen.parallel.sequence.context import SequenceContext
from paragen.parallel.sequence.seam import AttentionSite, open_seam

LENGTHS = (7, 12, 5, 9)  # every shard's tokens: no two alike


class Attend(torch.nn.Module):
    def forward(self, query, key, value, mask):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


def inputs(mask_kind: str, ranks: int):
    """The whole q, k, v `[2, 4, L, 8]` and mask `[2, 1, 1, L]` (None, or boolean: padding keys hidden from both
    batch elements, and with `per-sample`, some keys hidden from one of them only)."""
    total = sum(LENGTHS[:ranks])
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, total, 8, generator=generator) for _ in range(3))
    if mask_kind == "none":
        return q, k, v, None
    mask = torch.ones(2, 1, 1, total, dtype=torch.bool)
    mask[..., 3:6] = False  # hidden from every query: left out
    mask[..., total - 4:] = False  # the last shard's last keys
    if mask_kind == "per-sample":
        mask[0, ..., 10:12] = False
    return q, k, v, mask


if __name__ == "__main__":
    out, ulysses, ring = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    paragen.init()
    mesh = ParallelMesh(ParallelConfig(ulysses=ulysses, ring=ring), torch.device("cpu"))
    seq = SequenceContext(mesh.group("sequence"), mesh.group("ulysses"), mesh.group("ring"))
    rank, ranks = seq.comm.rank, seq.comm.size
    start = sum(LENGTHS[:rank])
    piece = slice(start, start + LENGTHS[rank])
    module = Attend()
    open_seam()
    site = AttentionSite(seq, "attend")
    site.install(module)
    seen = {}
    for mask_kind in ("none", "shared", "per-sample"):
        q, k, v, mask = inputs(mask_kind, ranks)
        local = module(q[:, :, piece], k[:, :, piece], v[:, :, piece], None if mask is None else mask[..., piece])
        whole = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        seen[mask_kind] = {"parts": all_gather_objects(mesh.group("world"), local), "whole": whole,
                           "lengths": site.lengths[((), 0)]}
        seq.end_request()
    if paragen.is_output_rank():
        torch.save(seen, out)
    paragen.shutdown()

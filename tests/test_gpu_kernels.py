"""The kernels' CUDA branches against their CPU references (`pytest -m gpu`; skipped where no CUDA device is present).

What runs differently on a GPU: `attention_with_lse` and `causal_attention_with_lse` dispatch to the fused
efficient-attention kernel (on the CPU: the flash kernel for CPUs), the sparse-KV pieces and RoPE run as CUDA
kernels (the SVD through cuSOLVER), and `ChunkFetcher` pins its host store and copies on a side stream, ordered
by an event. Every check draws fresh random inputs on the CPU, computes the reference there in float64, and
compares the CUDA result by relative error ‖got − want‖ / ‖want‖: float32 far below 1e-3, bf16 within 1e-2.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from paragen.kernels.attention import (
    _fused_attention_with_lse,
    attention_with_lse,
    causal_attention_with_lse,
    grouped_query_attention_with_lse,
    masked_attention_with_lse,
    merge_attention_partials,
    merge_attention_states,
    reference_attention_with_lse,
    repeat_kv,
)
from paragen.kernels.chunk_fetch import ChunkFetcher, to_host
from paragen.kernels.rope import apply_rope
from paragen.kernels.sparse_kv import (
    chunk_landmarks,
    chunk_max_deviation,
    chunked,
    gather_chunks,
    low_rank_factors,
    per_head_factor,
    rebuild_keys,
    select_chunks,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
# relative-error bounds by input dtype (float32 via the fused kernels: no TF32; bf16 inputs and outputs)
REL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
LSE_ABS = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """The references are float64; keep float32 CUDA matmuls in float32 (no TF32) for the duration of a test."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


_seed = [1000]


def randn(*shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    """Fresh CPU random data for every call (a new seed each time), rounded to `dtype`."""
    _seed[0] += 1
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(_seed[0]))).to(dtype)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite values in the CUDA result"
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def assert_rel(got: torch.Tensor, want: torch.Tensor, bound: float) -> None:
    err = rel_err(got, want)
    assert err < bound, f"relative error {err:.2e}, bound {bound:.0e}"


def assert_lse(got: torch.Tensor, want: torch.Tensor, bound: float) -> None:
    """Log-sum-exps agree within `bound` (absolute: it is a log), -inf where the reference has -inf."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = float((got - want).abs().max())
    assert err < bound, f"lse off by {err:.2e}, bound {bound:.0e}"


def ref_attention(q, k, v, causal=False, scale=None):
    """float64 attention on the CPU: (out, lse)."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v, lse


# ---- attention -------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 4, 200, 333, 64), (1, 8, 1, 4097, 128), (1, 3, 77, 77, 40)],
                         ids=["cross", "decode", "odd-dim"])
def test_attention_with_lse_cuda_matches_reference(dtype, shape):
    batch, heads, lq, lk, dim = shape
    q, k, v = randn(batch, heads, lq, dim, dtype=dtype), randn(batch, heads, lk, dim, dtype=dtype), randn(batch, heads, lk, dim, dtype=dtype)
    assert _fused_attention_with_lse(q.to(CUDA), k.to(CUDA), v.to(CUDA), None, causal=False) is not None, \
        "the CUDA branch must be the fused kernel"
    out, lse = attention_with_lse(q.to(CUDA), k.to(CUDA), v.to(CUDA))
    assert out.device.type == CUDA.type and out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (batch, heads, lq, dim) and lse.shape == (batch, heads, lq)
    want_out, want_lse = ref_attention(q, k, v)
    assert_rel(out, want_out, REL[dtype])
    assert_lse(lse, want_lse, LSE_ABS[dtype])
    # the CPU branch of the same function agrees with the CUDA one
    cpu_out, cpu_lse = attention_with_lse(q, k, v)
    assert_rel(out, cpu_out, 2 * REL[dtype])
    assert_lse(lse, cpu_lse, 2 * LSE_ABS[dtype])


@pytest.mark.gpu
def test_attention_with_lse_cuda_with_scale_and_reference_path():
    q, k, v = randn(1, 2, 50, 32), randn(1, 2, 90, 32), randn(1, 2, 90, 32)
    out, lse = attention_with_lse(q.to(CUDA), k.to(CUDA), v.to(CUDA), scale=0.3)
    want_out, want_lse = ref_attention(q, k, v, scale=0.3)
    assert_rel(out, want_out, 1e-4)
    assert_lse(lse, want_lse, 1e-4)
    # the plain-PyTorch reference also runs on CUDA tensors (it is the fallback for other dtypes)
    ref_out, ref_lse = reference_attention_with_lse(q.to(CUDA), k.to(CUDA), v.to(CUDA), scale=0.3)
    assert_rel(ref_out, want_out, 1e-4)
    assert_lse(ref_lse, want_lse, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lse_merge_on_cuda_equals_attention_over_the_union(dtype):
    q = randn(2, 4, 33, 64, dtype=dtype).to(CUDA)
    k, v = randn(2, 4, 700, 64, dtype=dtype).to(CUDA), randn(2, 4, 700, 64, dtype=dtype).to(CUDA)
    cuts = [(0, 1), (1, 250), (250, 700)]
    parts = [attention_with_lse(q, k[:, :, a:b], v[:, :, a:b]) for a, b in cuts]
    want_out, want_lse = ref_attention(q, k, v)
    # pairwise merge
    out, lse = parts[0]
    for other in parts[1:]:
        out, lse = merge_attention_states(out, lse, *other)
    assert out.device.type == CUDA.type
    assert_rel(out, want_out, REL[dtype])
    assert_lse(lse, want_lse, LSE_ABS[dtype])
    # N-way merge, with a part that saw no key (lse -inf) changing nothing
    parts.append((torch.zeros_like(parts[0][0]), torch.full_like(parts[0][1], float("-inf"))))
    outs, lses = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    merged, merged_lse = merge_attention_partials(outs, lses)
    assert_rel(merged, want_out, REL[dtype])
    assert_lse(merged_lse, want_lse, LSE_ABS[dtype])
    # the same parts merged on the CPU give the same result
    cpu_merged, _ = merge_attention_partials(outs.cpu(), lses.cpu())
    assert_rel(merged, cpu_merged, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_causal_attention_cuda_matches_reference(dtype):
    q, k, v = randn(1, 4, 300, 64, dtype=dtype), randn(1, 4, 300, 64, dtype=dtype), randn(1, 4, 300, 64, dtype=dtype)
    out, lse = causal_attention_with_lse(q.to(CUDA), k.to(CUDA), v.to(CUDA))
    want_out, want_lse = ref_attention(q, k, v, causal=True)
    assert_rel(out, want_out, REL[dtype])
    assert_lse(lse, want_lse, LSE_ABS[dtype])
    # the masked (non-fused) path, on CUDA, agrees too
    future = torch.ones(300, 300, dtype=torch.bool, device=CUDA).triu(1)
    mask = torch.zeros(300, 300, device=CUDA).masked_fill(future, float("-inf"))
    masked_out, masked_lse = masked_attention_with_lse(q.to(CUDA), k.to(CUDA), v.to(CUDA), mask)
    assert_rel(masked_out, want_out, REL[dtype])
    assert_lse(masked_lse, want_lse, LSE_ABS[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("queries", [1, 17], ids=["decode", "block"])
def test_grouped_query_attention_cuda_matches_repeated_heads(dtype, queries):
    q = randn(1, 32, queries, 128, dtype=dtype)
    k, v = randn(1, 8, 1000, 128, dtype=dtype), randn(1, 8, 1000, 128, dtype=dtype)
    out, lse = grouped_query_attention_with_lse(q.to(CUDA), k.to(CUDA), v.to(CUDA))
    want_out, want_lse = ref_attention(q, repeat_kv(k, 4), repeat_kv(v, 4))
    assert out.shape == (1, 32, queries, 128) and lse.shape == (1, 32, queries)
    assert_rel(out, want_out, REL[dtype])
    assert_lse(lse, want_lse, LSE_ABS[dtype])
    sdpa = F.scaled_dot_product_attention(q.to(CUDA), repeat_kv(k, 4).to(CUDA), repeat_kv(v, 4).to(CUDA))
    assert_rel(out, sdpa, 2 * REL[dtype])


# ---- sparse KV, RoPE -----------------------------------------------------------------------------------------
def _rope(positions: torch.Tensor, dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    angles = positions.to(device).float().unsqueeze(-1) * inv
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.gpu
def test_landmarks_deviation_and_gather_cuda_match_cpu():
    keys = randn(2, 4, 64 * 8, 32)
    landmarks = chunk_landmarks(keys.to(CUDA), 8)
    assert landmarks.device.type == CUDA.type
    assert_rel(landmarks, chunked(keys.double(), 8).mean(dim=3), 1e-6)
    deviation = chunk_max_deviation(keys.to(CUDA), landmarks, 8)
    want = (chunked(keys.double(), 8) - chunked(keys.double(), 8).mean(dim=3, keepdim=True)).norm(dim=-1).amax(dim=-1)
    assert_rel(deviation, want, 1e-5)
    indices = torch.randint(0, 64, (2, 4, 5), generator=torch.Generator().manual_seed(3))
    gathered = gather_chunks(chunked(keys.to(CUDA), 8), indices.to(CUDA))
    assert torch.equal(gathered.cpu(), gather_chunks(chunked(keys, 8), indices))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_top_k_chunk_selection_cuda_picks_the_best_chunks(dtype):
    query = randn(2, 8, 1, 64, dtype=dtype)
    landmarks = randn(2, 2, 300, 64, dtype=dtype)
    excluded = torch.zeros(2, 2, 300, dtype=torch.bool)
    excluded[:, :, ::37] = True
    count = 12
    chosen = select_chunks(query.to(CUDA), landmarks.to(CUDA), count, excluded.to(CUDA))
    assert chosen.shape == (2, 2, count) and chosen.device.type == CUDA.type
    # float64 scores: a chunk scores its best query head of the group
    scores = (query.double().reshape(2, 2, 4, 64) @ landmarks.double().transpose(-1, -2)).amax(dim=2)
    scores = scores.masked_fill(excluded, float("-inf"))
    kth = scores.topk(count, dim=-1).values[..., -1:]
    picked = scores.gather(-1, chosen.cpu())
    assert not excluded.gather(-1, chosen.cpu()).any(), "an excluded chunk was selected"
    assert len(set(chosen[0, 0].tolist())) == count
    tolerance = 1e-4 if dtype == torch.float32 else 0.5  # bf16 scores near the cut may swap
    assert (picked >= kth - tolerance).all()
    if dtype == torch.float32:  # exact arithmetic: the same sets as the CPU
        cpu = select_chunks(query, landmarks, count, excluded)
        assert torch.equal(chosen.sort(dim=-1).values.cpu(), cpu.sort(dim=-1).values)


@pytest.mark.gpu
def test_low_rank_factors_and_key_rebuild_with_rope_cuda_match_cpu():
    batch, heads, length, dim, rank, size = 1, 4, 512, 32, 48, 8
    # keys that are low-rank plus noise, as pre-RoPE keys tend to be
    flat = randn(batch, length, rank) @ randn(batch, rank, heads * dim) + 0.01 * randn(batch, length, heads * dim)
    left, right = low_rank_factors(flat.to(CUDA), rank)
    assert left.device.type == CUDA.type and left.shape == (batch, length, rank) and right.shape == (batch, rank, heads * dim)
    cpu_left, cpu_right = low_rank_factors(flat, rank)
    # the factors are unique only up to signs; their product is not
    assert_rel(left @ right, cpu_left @ cpu_right, 1e-4)
    assert_rel(left @ right, flat, 0.05)
    # at full rank the keys come back exactly
    full_left, full_right = low_rank_factors(flat.to(CUDA), heads * dim)
    assert_rel(full_left @ full_right, flat, 1e-4)

    right_heads = per_head_factor(right, dim)
    assert right_heads.shape == (batch, heads, rank, dim)
    chunk = torch.tensor([3, 17, 60, 0, 5])
    batch_index, head_index = torch.zeros(5, dtype=torch.long), torch.tensor([0, 1, 3, 2, 3])
    rows = chunk.unsqueeze(-1) * size + torch.arange(size)
    rebuilt = rebuild_keys(left, right_heads, batch_index.to(CUDA), head_index.to(CUDA), rows.to(CUDA))
    want = (left.cpu().double() @ right.cpu().double()).view(batch, length, heads, dim)[batch_index.unsqueeze(-1), rows,
                                                                                         head_index.unsqueeze(-1)]
    assert rebuilt.shape == (5, size, dim)
    assert_rel(rebuilt, want, 1e-5)
    start = 1000  # the shard's first absolute position
    cos, sin = _rope(start + rows, dim, CUDA)
    rotated = apply_rope(rebuilt, cos, sin)
    cpu_cos, cpu_sin = _rope(start + rows, dim, "cpu")
    want_rotated = apply_rope(want, cpu_cos.double(), cpu_sin.double())
    assert_rel(rotated, want_rotated, 1e-5)
    # RoPE preserves each head vector's norm
    assert torch.allclose(rotated.norm(dim=-1), rebuilt.norm(dim=-1), rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rope_cuda_matches_cpu(dtype):
    states = randn(2, 8, 100, 128, dtype=dtype)
    cos, sin = _rope(torch.arange(5000, 5100), 128, "cpu")
    got = apply_rope(states.to(CUDA), cos.to(CUDA, dtype), sin.to(CUDA, dtype))
    want = apply_rope(states.double(), cos.double(), sin.double())
    assert_rel(got, want, REL[dtype])


# ---- ChunkFetcher ------------------------------------------------------------------------------------------------
def _busy(products: int = 100) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Queue a long chain of 8192² bf16 matmuls (about 1.5 ms each on an H100/H200) on the current (compute) stream;
    returns its output and an event recorded after it."""
    a = torch.randn(8192, 8192, device=CUDA, dtype=torch.bfloat16) / 90.0
    out = a
    for _ in range(products):
        out = torch.tanh(out @ a)
    end = torch.cuda.Event()
    end.record()
    return out, end


@pytest.mark.gpu
def test_chunk_fetcher_copies_from_pinned_memory_to_the_device():
    values = randn(2, 4, 256, 8, 64).to(CUDA)  # [B, H, n, c, D] on the device
    host = to_host(values)
    assert host.device.type == "cpu" and host.is_pinned(), "the host store must be pinned on CUDA"
    assert torch.equal(host, values.cpu())
    fetcher = ChunkFetcher(CUDA)
    try:
        b = torch.tensor([0, 1, 1, 0, 1])
        h = torch.tensor([3, 0, 2, 1, 3])
        c = torch.tensor([255, 0, 17, 17, 100])
        pending = fetcher.start(host, (b.to(CUDA), h.to(CUDA), c.to(CUDA)))  # device index tensors, as the store passes them
        got = fetcher.wait(pending)
        assert got.device.type == CUDA.type and got.shape == (5, 8, 64)
        assert torch.equal(got.cpu(), host[b, h, c])
    finally:
        fetcher.close()


@pytest.mark.gpu
def test_chunk_fetcher_copy_overlaps_compute_on_the_default_stream():
    """The copy runs on a side stream: it completes while a long kernel chain still occupies the compute stream."""
    host = to_host(randn(1, 8, 4096, 8, 128).to(CUDA))  # 128 MiB pinned
    index = (torch.zeros(2048, dtype=torch.long), torch.arange(2048) % 8, torch.randperm(4096)[:2048])
    fetcher = ChunkFetcher(CUDA)
    try:
        fetcher.wait(fetcher.start(host, index))  # warm-up: thread, stream, pinned staging
        torch.cuda.synchronize()
        busy, busy_done = _busy(100)
        # host-side indices: device ones would make start() wait for the compute stream (their .cpu() synchronises)
        pending = fetcher.start(host, index)
        moved, (copied, _staged) = pending.result()
        copied.synchronize()  # the side stream's copy is done ...
        still_busy = not busy_done.query()  # ... while the compute stream still works
        got = fetcher.wait(pending)
        torch.cuda.synchronize()
        assert still_busy, "the fetch waited for the compute stream: it is not on a side stream, or the kernels were too short"
        assert torch.equal(got.cpu(), host[index]) and torch.isfinite(busy).all()
    finally:
        fetcher.close()


@pytest.mark.gpu
def test_a_fetched_tensor_survives_its_release_while_the_compute_stream_still_reads_it():
    """Use a fetched chunk set on the compute stream behind a long kernel chain, drop it, and fetch again at once:
    the second fetch must not reuse the first one's memory while the compute stream has not read it yet (the
    device tensor comes from the side stream's pool, so the compute stream's use must be recorded on it)."""
    first = randn(4096, 1024)
    second = randn(4096, 1024) + 100.0
    hosts = [to_host(first.to(CUDA)), to_host(second.to(CUDA))]
    index = (torch.arange(4096),)
    fetcher = ChunkFetcher(CUDA)
    try:
        fetcher.wait(fetcher.start(hosts[0], index))
        torch.cuda.synchronize()
        got = fetcher.wait(fetcher.start(hosts[0], index))
        _busy(100)  # the compute stream is busy ...
        doubled = got * 2  # ... so this reads `got` only later
        del got
        again = fetcher.wait(fetcher.start(hosts[1], index))
        torch.cuda.synchronize()
        assert torch.equal(again.cpu(), second)
        assert torch.equal(doubled.cpu(), first * 2), \
            "the first fetch's memory was overwritten before the compute stream read it (missing record_stream)"
    finally:
        fetcher.close()


@pytest.mark.gpu
def test_chunk_fetcher_results_equal_cpu_indexing_over_many_fetches():
    values = randn(1, 8, 512, 8, 128, dtype=torch.bfloat16).to(CUDA)
    host = to_host(values)
    fetcher = ChunkFetcher(CUDA)
    try:
        for step in range(20):
            g = torch.Generator().manual_seed(step)
            count = int(torch.randint(1, 300, (1,), generator=g))
            index = (torch.zeros(count, dtype=torch.long), torch.randint(0, 8, (count,), generator=g),
                     torch.randint(0, 512, (count,), generator=g))
            pending = fetcher.start(host, tuple(i.to(CUDA) for i in index))
            _ = torch.randn(2048, 2048, device=CUDA) @ torch.randn(2048, 2048, device=CUDA)  # compute meanwhile
            got = fetcher.wait(pending)
            assert torch.equal(got.cpu(), values.cpu()[index]), f"fetch {step} differs"
    finally:
        fetcher.close()

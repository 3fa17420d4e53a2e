"""The multi-rank part of `bench/gpu_check.py`: several ranks on ONE device, over gloo.

NCCL refuses two ranks on one GPU, so the ranks share `cuda:0` through `paragen.init(device="cuda:0",
backend="gloo")` (or the CPU with `--device cpu`). Gloo takes CUDA tensors in some operations only: torch's
ProcessGroupGloo has CUDA code paths for all_reduce and broadcast (and, in recent releases, all-gather and
all-to-all), while send/recv hand the tensor's data pointer to the TCP transport as if it were host memory.
Which ones work on this machine's torch is what `probe` finds out. Two tasks, each run by every rank:

- `probe`: every collective paragen issues (and a few more), on tensors of the rank's device, one by one,
  point-to-point last; each rank writes what happened after every operation (`<result>.rank<r>.json`),
  so a crash or a hang still leaves the answer up to the operation that broke.
- `run`: the tiny SD pipeline in sync patch mode (`patch` = the world size, exact) and the tiny passkey
  LLM with a dense sequence-sharded cache (`seq` = the world size); rank 0 writes the image tensor and
  the generated tokens. Run once at world size 1 and once at 2, the driver compares them.
  `--stage OPS` routes the named operations' CUDA tensors through host memory (see `install_host_staging`):
  the fallback when gloo cannot move CUDA tensors in an operation paragen uses.

Launched by the driver with torchrun's environment variables (RANK, WORLD_SIZE, MASTER_ADDR, ...).
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

# Operations paragen's comms issue on device tensors (paragen/comms/group.py), by the name `--stage` takes.
PARAGEN_OPS = ("p2p", "all_gather_flat", "all_to_all", "broadcast", "all_reduce")


class _StagedWork:
    """A backend work on host copies; `wait` copies what arrived back into the device tensors."""

    def __init__(self, work, after=None, keep=()):
        self._work, self._after, self._keep = work, after, keep

    def wait(self, timeout=None) -> bool:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._after is not None:
            self._after()
            self._after = None
        self._keep = ()
        return True

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def install_host_staging(ops: set[str], every_tensor: bool = False) -> list[str]:
    """Wrap torch.distributed's functions (and paragen's bound all-gather) for the operations in `ops` so that a
    CUDA tensor travels as a host copy: sends copy it out first, receives copy the host buffer in at `wait()`.
    `every_tensor`: stage CPU tensors too (a copy to a copy: how the CPU run exercises this path). Returns what was
    wrapped."""
    import paragen.comms.group as group_module

    wrapped = []

    def staged(tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and (tensor.is_cuda or every_tensor)

    def collective(original, copy_back_first_arg: bool, two_tensors: bool):
        def call(*args, **kwargs):
            tensors = args[:2] if two_tensors else args[:1]
            if not any(staged(t) for t in tensors):
                return original(*args, **kwargs)
            async_op = kwargs.pop("async_op", False)
            hosts = [_host(t) for t in tensors]
            target = args[0]
            work = original(*hosts, *args[len(tensors):], async_op=True, **kwargs)
            after = (lambda: target.copy_(hosts[0])) if copy_back_first_arg else None
            pending = _StagedWork(work, after, hosts)
            if async_op:
                return pending
            pending.wait()
            return None
        return call

    if "p2p" in ops:
        original_isend, original_irecv = dist.isend, dist.irecv

        def isend(tensor, *args, **kwargs):
            if not staged(tensor):
                return original_isend(tensor, *args, **kwargs)
            host = _host(tensor)
            return _StagedWork(original_isend(host, *args, **kwargs), keep=(host,))

        def irecv(tensor, *args, **kwargs):
            if not staged(tensor):
                return original_irecv(tensor, *args, **kwargs)
            host = torch.empty(tensor.shape, dtype=tensor.dtype)
            return _StagedWork(original_irecv(host, *args, **kwargs), lambda: tensor.copy_(host), (host,))

        dist.isend, dist.irecv = isend, irecv
        wrapped += ["isend", "irecv"]
    if "all_gather_flat" in ops:
        name = getattr(group_module._all_gather_flat, "__name__", "?")
        group_module._all_gather_flat = collective(group_module._all_gather_flat, True, True)
        wrapped.append(f"paragen.comms.group._all_gather_flat ({name})")
    if "all_to_all" in ops:
        dist.all_to_all_single = collective(dist.all_to_all_single, True, True)
        wrapped.append("all_to_all_single")
    if "broadcast" in ops:
        dist.broadcast = collective(dist.broadcast, True, False)
        wrapped.append("broadcast")
    if "all_reduce" in ops:
        dist.all_reduce = collective(dist.all_reduce, True, False)
        wrapped.append("all_reduce")
    return wrapped


# ---- probe -------------------------------------------------------------------------------------------------
def _probe_ops(rank: int, world: int, device: torch.device):
    """(name, paragen op it stands for or None, function returning (got, want)) for every probed operation."""
    gen = torch.Generator().manual_seed(1234)
    base = torch.randn(world, 1000, generator=gen)  # every rank knows every rank's data

    def mine(dtype=torch.float32):
        return base[rank].clone().to(device=device, dtype=dtype)  # a copy: in-place collectives must not touch `base`

    def all_reduce(dtype=torch.float32):
        def op():
            t = mine(dtype)
            dist.all_reduce(t)
            return t, base.to(dtype).sum(0)
        return op

    def broadcast():
        t = mine()
        dist.broadcast(t, src=0)
        return t, base[0]

    def all_gather_list():
        out = [torch.empty(1000, device=device) for _ in range(world)]
        dist.all_gather(out, mine())
        return torch.stack(out), base

    def all_gather_into_tensor():
        out = torch.empty(world * 1000, device=device)
        flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        flat(out, mine(), async_op=True).wait()
        return out.view(world, 1000), base

    def all_to_all_single(uneven: bool):
        def op():
            counts = [100 + 50 * j if uneven else 500 // world * 2 for j in range(world)]
            want_parts = []
            for src in range(world):
                src_counts = counts  # every rank uses the same split sizes for what it sends to rank j
                offset = sum(src_counts[:rank])
                want_parts.append(base[src, offset: offset + src_counts[rank]])
            send = mine()[: sum(counts)]
            out = torch.empty(counts[rank] * world, device=device)
            dist.all_to_all_single(out, send, output_split_sizes=[counts[rank]] * world, input_split_sizes=counts,
                                   async_op=True).wait()
            return out, torch.cat(want_parts)
        return op

    def reduce_scatter():
        out = torch.empty(1000 // world, device=device)
        dist.reduce_scatter_tensor(out, mine())
        want = base.sum(0).view(world, -1)[rank]
        return out, want

    def p2p():
        nxt, prev = (rank + 1) % world, (rank - 1) % world
        incoming = torch.empty(1000, device=device)
        works = [dist.isend(mine(), dst=nxt, tag=7), dist.irecv(incoming, src=prev, tag=7)]
        for w in works:
            w.wait()
        return incoming, base[prev]

    return [
        ("all_reduce", "all_reduce", all_reduce()),
        ("all_reduce_bf16", None, all_reduce(torch.bfloat16)),
        ("broadcast", "broadcast", broadcast),
        ("all_gather", None, all_gather_list),
        ("all_gather_into_tensor", "all_gather_flat", all_gather_into_tensor),
        ("all_to_all_single", "all_to_all", all_to_all_single(False)),
        ("all_to_all_single_uneven", "all_to_all", all_to_all_single(True)),
        ("reduce_scatter_tensor", None, reduce_scatter),
        ("isend_irecv", "p2p", p2p),  # last: the likeliest to break the process
    ]


def probe(args, rank: int, world: int) -> None:
    device = torch.device(args.device)
    out_path = Path(f"{args.result}.rank{rank}.json")
    record: dict = {"rank": rank, "device": str(device), "backend": dist.get_backend(), "torch": torch.__version__,
                    "ops": {}}
    for name, paragen_op, op in _probe_ops(rank, world, device):
        record["current"] = name
        out_path.write_text(json.dumps(record))
        entry: dict = {"paragen_op": paragen_op}
        started = time.perf_counter()
        try:
            got, want = op()
            if device.type == "cuda":
                torch.cuda.synchronize()
            entry["ok"] = True
            entry["correct"] = bool(torch.allclose(got.float().cpu(), want.float().cpu(), atol=1e-2 if got.dtype == torch.bfloat16 else 1e-5))
            entry["result_device"] = str(got.device)
        except Exception as error:  # noqa: BLE001 - an unsupported operation is a finding, not a failure
            entry["ok"] = False
            entry["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
        entry["seconds"] = time.perf_counter() - started
        record["ops"][name] = entry
    record.pop("current", None)
    record["done"] = True
    out_path.write_text(json.dumps(record))


# ---- run -------------------------------------------------------------------------------------------------------
def run(args, rank: int, world: int) -> None:
    import paragen
    from paragen.parallel.llm import KVConfig, cache_argument
    from paragen.pipelines.llm import parallelize_llm
    from paragen.pipelines.llm.loading import load_llm
    from paragen.pipelines.loading import load_pipeline
    from paragen.pipelines.llm.passkey import DIGITS, decode_key, make_prompt

    device = paragen.rank_device()
    dtype = getattr(torch, args.dtype)
    result: dict = {"world_size": world, "device": str(device), "backend": dist.get_backend() if dist.is_initialized() else None,
                    "dtype": args.dtype}
    timings = {}

    started = time.perf_counter()
    pipe = load_pipeline("tiny-sd", dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    paragen.parallelize(pipe, paragen.ParallelConfig(patch=world), paragen.ExchangeConfig(mode="sync"))
    image = pipe("a lighthouse on a cliff at dusk, oil painting", height=args.size, width=args.size,
                 num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="pt").images
    timings["image_s"] = time.perf_counter() - started
    result["image_shape"] = list(image.shape)
    result["image_finite"] = bool(torch.isfinite(image).all())
    result["image_comm"] = pipe.paragen.stats.snapshot().get("total")
    del pipe

    started = time.perf_counter()
    model = load_llm("tiny-passkey", dtype=dtype, device=device)
    runtime = parallelize_llm(model, paragen.ParallelConfig(seq=world), KVConfig(mode="dense"))
    prompt = make_prompt(args.context, 0.4, torch.Generator().manual_seed(5))
    cache = runtime.new_cache()
    try:
        out = model.generate(prompt.tokens[None].to(device), **cache_argument(cache), max_new_tokens=args.new_tokens,
                             do_sample=False, top_k=None, top_p=None)
    finally:
        cache.close()
    timings["llm_s"] = time.perf_counter() - started
    tokens = out[0, len(prompt.tokens):].tolist()
    result.update(llm_tokens=tokens, llm_context=args.context, passkey=prompt.key,
                  passkey_answer=decode_key(tokens[:DIGITS]), llm_prefill_s=runtime.prefill_s)
    result["timings"] = timings
    if rank == 0:
        torch.save(image.float().cpu(), f"{args.result}.image.pt")
        Path(args.result).write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=("probe", "run"))
    p.add_argument("--device", default="cuda:0", help="the one device every rank uses (cuda:0 or cpu)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--stage", default="", help=f"comma-separated ops to stage through host memory ({', '.join(PARAGEN_OPS)})")
    p.add_argument("--stage-every-tensor", action="store_true", help="stage CPU tensors too (exercises --stage on the CPU)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--context", type=int, default=2048, help="LLM prompt tokens")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--timeout", type=float, default=60, help="seconds after which a collective fails")
    p.add_argument("--result", required=True)
    args = p.parse_args()

    import paragen

    # Exact arithmetic where the backend allows it, so that 1 rank and 2 ranks compare closely.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    paragen.init(device=args.device, backend="gloo", timeout_s=args.timeout, init_timeout_s=120, threads=1 if args.device == "cpu" else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        staged = install_host_staging({op for op in args.stage.split(",") if op}, args.stage_every_tensor) if args.stage else []
        if staged and rank == 0:
            Path(f"{args.result}.staged.json").write_text(json.dumps(staged))
        (probe if args.task == "probe" else run)(args, rank, world)
    except Exception:
        Path(f"{args.result}.error.rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        paragen.shutdown()


if __name__ == "__main__":
    main()

"""`paragen llm`: one causal-LM request — check, load, parallelise, generate, report.

The embedded models speak the passkey task's vocabulary (`paragen.pipelines.llm.passkey`): their prompt is
a passkey prompt of `context` tokens with the key at `depth`, and the report says whether the answer
is the key. A local checkpoint takes a text prompt (`prompt` or `prompt_file`), tokenised by the
checkpoint's own tokenizer.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from paragen.comms import all_gather_objects, rank_device
from paragen.log import get_logger
from paragen.parallel.config import ParallelConfig
from paragen.parallel.llm.cache import cache_argument
from paragen.parallel.llm.config import KV_MODES, KVConfig
from paragen.pipelines import registry
from paragen.pipelines.dtypes import check_dtype, resolve_dtype
from paragen.pipelines.jobs.batch import open_batch
from paragen.pipelines.jobs.common import Prepared, add_output_arguments, output_stem
from paragen.pipelines.llm.loading import EMBEDDED_LLMS, build_llm, check_llm_source, model_root
from paragen.pipelines.llm.passkey import DIGITS, PasskeyPrompt, check_passkey_length, decode_key, make_prompt
from paragen.pipelines.llm.runtime import check_prompt_length
from paragen.pipelines.outputs import check_out_dir, save_json
from paragen.pipelines.report import job_report


@dataclass(frozen=True)
class LLMRequest:
    """Everything `paragen llm` was asked for."""

    model: str = "tiny-passkey"
    prompt: str | None = None  # text, for a local checkpoint with a tokenizer
    prompt_file: str | None = None  # the same, read from a file
    context: int = 4096  # embedded models: the passkey prompt's tokens
    depth: float = 0.5  # ... and where in it the key sits
    new_tokens: int = 16
    sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    dtype: str = "auto"  # float32 on CPU, bfloat16/float16 on a GPU
    allow_pickle: bool = False
    allow_remote_code: bool = False
    out_dir: str = "out"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.context < 1 or self.new_tokens < 1:
            raise ValueError(f"context and new tokens must be positive, got {self.context} and {self.new_tokens}")
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {self.depth}")
        if self.temperature <= 0 or (self.top_k is not None and self.top_k < 1):
            raise ValueError(f"temperature must be > 0 and top-k >= 1, got {self.temperature} and {self.top_k}")
        check_dtype(self.dtype)
        if self.prompt is not None and self.prompt_file is not None:
            raise ValueError("give --prompt or --prompt-file, not both")
        text = self.prompt is not None or self.prompt_file is not None
        if self.model in EMBEDDED_LLMS and text:
            raise ValueError(f"{self.model} has no tokenizer: it reads passkey prompts (--context, --depth), not text")
        if self.model not in EMBEDDED_LLMS and not text:
            raise ValueError("a local checkpoint needs a text prompt: --prompt or --prompt-file")
        if self.model in EMBEDDED_LLMS:
            check_passkey_length(self.context)


@dataclass(frozen=True)
class Prompted:
    """A checked request, the token ids every rank feeds to `generate`, and how to read the answer."""

    request: LLMRequest
    ids: torch.Tensor  # [1, L]
    passkey: PasskeyPrompt | None
    tokenizer: Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `paragen llm`."""
    defaults, kv = LLMRequest(), KVConfig()
    p.description = ("Generate from one long prompt with its sequence cut into shards, one per ring position, "
                     "each shard's weights optionally split by tensor parallelism.")
    p.add_argument("--model", default=defaults.model,
                   help=f"embedded model ({', '.join(EMBEDDED_LLMS)}: passkey prompts) or a local transformers "
                        "Llama/Qwen2/Mistral directory (safetensors) with its tokenizer")
    p.add_argument("--prompt", default=None, help="text prompt (local checkpoints)")
    p.add_argument("--prompt-file", default=None, help="read the text prompt from this file (local checkpoints)")
    p.add_argument("--context", type=int, default=defaults.context, help="embedded models: tokens of the passkey prompt")
    p.add_argument("--depth", type=float, default=defaults.depth, help="embedded models: where the key sits, 0 (start) to 1 (end)")
    p.add_argument("--new-tokens", type=int, default=defaults.new_tokens, help="tokens to generate")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (same seed on every rank)")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (prompt and sampling)")
    p.add_argument("--seq", type=int, default=-1, help="sequence shards (-1: the ranks / --tp)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per shard (DeepSpeed AutoTP)")
    p.add_argument("--kv", choices=KV_MODES, default=kv.mode,
                   help="dense: exact K/V on the device; offload: ShadowKV — low-rank keys, values in host memory, "
                        "top-k chunks fetched per token")
    p.add_argument("--budget", type=float, default=kv.budget, help="offload: fraction of the context fetched per token")
    p.add_argument("--rank", type=int, default=None, help="offload: SVD rank of the keys (default: 160/1024 of the key width)")
    p.add_argument("--chunk", type=int, default=kv.chunk, help="offload: tokens per chunk")
    p.add_argument("--window", type=int, default=kv.window, help="offload: most recent prompt tokens kept exact")
    p.add_argument("--allow-remote-code", action="store_true",
                   help="allow a checkpoint whose config names remote code (auto_map), which runs arbitrary Python")
    add_output_arguments(p, defaults.out_dir, "the JSON run report")


def prepare(args: argparse.Namespace, launch) -> Prepared:
    """Check the request against the model and build its prompt, before any collective (same on every rank)."""
    request = LLMRequest(
        model=args.model, prompt=args.prompt, prompt_file=args.prompt_file, context=args.context, depth=args.depth,
        new_tokens=args.new_tokens, sample=args.sample, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        dtype=args.dtype, allow_pickle=args.allow_pickle, allow_remote_code=args.allow_remote_code, out_dir=args.out,
        name=args.name,
    )
    options = KVConfig(mode=args.kv, budget=args.budget, rank=args.rank, chunk=args.chunk, window=args.window)
    class_name = check_llm_source(request.model, allow_pickle=request.allow_pickle,
                                  allow_remote_code=request.allow_remote_code)
    workload = registry.find_for_job("llm", class_name, options, request.model)
    config = workload.resolve(ParallelConfig(seq=args.seq, tp=args.tp), launch.world_size)
    from transformers import AutoConfig

    root = model_root(request.model)
    model_config = AutoConfig.from_pretrained(root, local_files_only=True, trust_remote_code=request.allow_remote_code)
    workload.check(model_config, config, options)
    check_out_dir(args.out)
    tokenizer = None
    if request.model not in EMBEDDED_LLMS:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True, trust_remote_code=request.allow_remote_code)

    def prompt(one: LLMRequest) -> Prompted:
        if tokenizer is None:
            passkey = make_prompt(one.context, one.depth, torch.Generator().manual_seed(one.seed))
            ids = passkey.tokens.unsqueeze(0)
        else:
            text = one.prompt if one.prompt is not None else Path(one.prompt_file).read_text(encoding="utf-8")
            ids, passkey = tokenizer(text, return_tensors="pt").input_ids, None
        check_prompt_length(ids.shape[1], one.new_tokens, model_config.max_position_embeddings, config.seq)
        return Prompted(one, ids, passkey, tokenizer)

    batch = open_batch(args, launch, request, prompt)
    if batch is not None:
        return Prepared(request, workload, config, options, prompt, batch=batch)
    return Prepared(request, workload, config, options, prompt, item=prompt(request))


def load(job: Prepared) -> Any:
    """The job's model on this rank's device, parallelised; returns its runtime."""
    request = job.request
    model = build_llm(request.model, dtype=resolve_dtype(request.dtype), device=rank_device(),
                      allow_pickle=request.allow_pickle, allow_remote_code=request.allow_remote_code)
    return job.workload.install(model, job.config, job.options).paragen


def generate(job: Prepared, runtime, prompted: Prompted, load_s: float) -> dict | None:
    """One completion on every rank; the output rank writes the JSON report and returns it."""
    log = get_logger()
    request = prompted.request
    model = runtime.model  # tensor parallelism may hand back the sharded module
    cache = runtime.new_cache()
    loaded = time.perf_counter()
    torch.manual_seed(request.seed)
    sampling = {"do_sample": True, "temperature": request.temperature, "top_k": request.top_k} if request.sample \
        else {"do_sample": False, "top_k": None}
    try:
        out = model.generate(prompted.ids.to(rank_device()), **cache_argument(cache),
                             max_new_tokens=request.new_tokens, top_p=None, **sampling)
    finally:
        cache.close()
    generated = time.perf_counter()
    new = out[0, prompted.ids.shape[1]:].tolist()
    kv_report = {"device_bytes": cache.device_bytes(), "host_bytes": cache.host_bytes(),
                 "fetched_bytes_per_token": cache.fetched_bytes() / max(1, len(runtime.step_seconds))}
    kv_per_rank = all_gather_objects(runtime.mesh.group("world"), kv_report)
    report = job_report("llm", asdict(request), model, job.workload, job.options, load_s=load_s,
                        generate_s=generated - loaded)
    if report is None:
        return None
    decode = runtime.step_seconds
    report.update(
        prompt_tokens=prompted.ids.shape[1], new_tokens=new, prefill_s=runtime.prefill_s,
        decode_tokens_per_s=len(decode) / sum(decode) if decode else None,
        kv_per_rank={str(rank): value for rank, value in enumerate(kv_per_rank)},
    )
    if prompted.passkey is not None:
        answer = decode_key(new[:DIGITS])
        report.update(passkey=prompted.passkey.key, answer=answer, correct=answer == prompted.passkey.key)
        log.info("passkey %s at depth %.2f of %d tokens: answered %s (%s)", prompted.passkey.key, request.depth,
                 prompted.ids.shape[1], answer, "correct" if report["correct"] else "wrong")
    else:
        report.update(text=prompted.tokenizer.decode(new, skip_special_tokens=True))
        log.info("generated: %s", report["text"])
    stem = output_stem(request, job.config, job.options, f"{prompted.ids.shape[1]}tok")
    path = save_json(report, Path(request.out_dir) / f"{stem}.json")
    log.info("prefill %.2f s, decode %.1f tokens/s; wrote %s", runtime.prefill_s, report["decode_tokens_per_s"] or 0, path)
    return report

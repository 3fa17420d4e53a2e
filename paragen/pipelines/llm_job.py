"""One causal-LM request from the command line: load, parallelise, generate, report.

The embedded models speak the passkey task's vocabulary (`paragen.pipelines.passkey`): their prompt is
a passkey prompt of `context` tokens with the key at `depth`, and the report says whether the answer
is the key. A local checkpoint takes a text prompt (`prompt` or `prompt_file`), tokenised by the
checkpoint's own tokenizer.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from paragen.comms import all_gather_objects, rank_device
from paragen.log import get_logger
from paragen.parallel import ParallelConfig
from paragen.parallel.llm import KVConfig, cache_argument
from paragen.pipelines.dtypes import check_dtype, resolve_dtype
from paragen.pipelines.llm import check_llm_parallel, check_prompt_length, parallelize_llm
from paragen.pipelines.llm_loading import EMBEDDED_LLMS, check_llm_source, load_llm, model_root
from paragen.pipelines.outputs import save_json
from paragen.pipelines.passkey import DIGITS, PasskeyPrompt, check_passkey_length, decode_key, make_prompt
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
class PreparedPrompt:
    """The token ids every rank feeds to `generate`, and how to read the answer."""

    ids: torch.Tensor  # [1, L]
    passkey: PasskeyPrompt | None
    tokenizer: Any


def prepare_prompt(request: LLMRequest, config: ParallelConfig, kv: KVConfig) -> PreparedPrompt:
    """Check the request against the model and build its prompt, before any collective (same on every rank)."""
    check_llm_source(request.model, allow_pickle=request.allow_pickle, allow_remote_code=request.allow_remote_code)
    from transformers import AutoConfig

    root = model_root(request.model)
    model_config = AutoConfig.from_pretrained(root, local_files_only=True, trust_remote_code=request.allow_remote_code)
    check_llm_parallel(model_config, config, kv)
    if request.model in EMBEDDED_LLMS:
        passkey = make_prompt(request.context, request.depth, torch.Generator().manual_seed(request.seed))
        ids, tokenizer = passkey.tokens.unsqueeze(0), None
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True, trust_remote_code=request.allow_remote_code)
        text = request.prompt if request.prompt is not None else Path(request.prompt_file).read_text(encoding="utf-8")
        ids, passkey = tokenizer(text, return_tensors="pt").input_ids, None
    check_prompt_length(ids.shape[1], request.new_tokens, model_config.max_position_embeddings, config.seq)
    return PreparedPrompt(ids=ids, passkey=passkey, tokenizer=tokenizer)


def run_llm_job(request: LLMRequest, config: ParallelConfig, kv: KVConfig, prompt: PreparedPrompt) -> dict | None:
    """Generate on every rank; the output rank writes the JSON report and returns it."""
    log = get_logger()
    start = time.perf_counter()
    model = load_llm(request.model, dtype=resolve_dtype(request.dtype), device=rank_device(),
                     allow_pickle=request.allow_pickle, allow_remote_code=request.allow_remote_code)
    runtime = parallelize_llm(model, config, kv)
    cache = runtime.new_cache()
    loaded = time.perf_counter()
    torch.manual_seed(request.seed)
    sampling = {"do_sample": True, "temperature": request.temperature, "top_k": request.top_k} if request.sample \
        else {"do_sample": False, "top_k": None}
    try:
        out = model.generate(prompt.ids.to(rank_device()), **cache_argument(cache), max_new_tokens=request.new_tokens,
                             top_p=None, **sampling)
    finally:
        cache.close()
    generated = time.perf_counter()
    new = out[0, prompt.ids.shape[1]:].tolist()
    kv_report = {"device_bytes": cache.device_bytes(), "host_bytes": cache.host_bytes(),
                 "fetched_bytes_per_token": cache.fetched_bytes() / max(1, len(runtime.step_seconds))}
    kv_per_rank = all_gather_objects(runtime.mesh.comm("world"), kv_report)
    report = job_report("llm", asdict(request), model, load_s=loaded - start, generate_s=generated - loaded)
    if report is None:
        return None
    decode = runtime.step_seconds
    report.update(
        kv=asdict(kv), prompt_tokens=prompt.ids.shape[1], new_tokens=new, prefill_s=runtime.prefill_s,
        decode_tokens_per_s=len(decode) / sum(decode) if decode else None,
        kv_per_rank={str(rank): value for rank, value in enumerate(kv_per_rank)},
    )
    if prompt.passkey is not None:
        answer = decode_key(new[:DIGITS])
        report.update(passkey=prompt.passkey.key, answer=answer, correct=answer == prompt.passkey.key)
        log.info("passkey %s at depth %.2f of %d tokens: answered %s (%s)", prompt.passkey.key, request.depth,
                 prompt.ids.shape[1], answer, "correct" if report["correct"] else "wrong")
    else:
        report.update(text=prompt.tokenizer.decode(new, skip_special_tokens=True))
        log.info("generated: %s", report["text"])
    layout = runtime.config  # resolved: seq × tp is the world size
    stem = request.name or f"llm_{request.model.replace('/', '_').strip('_')}_seq{layout.seq}_tp{layout.tp}_{kv.mode}"
    path = save_json(report, Path(request.out_dir) / f"{stem}.json")
    log.info("prefill %.2f s, decode %.1f tokens/s; wrote %s", runtime.prefill_s, report["decode_tokens_per_s"] or 0, path)
    return report


__all__ = ["LLMRequest", "prepare_prompt", "run_llm_job"]

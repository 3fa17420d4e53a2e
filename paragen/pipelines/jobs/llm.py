"""`paragen llm`: one causal-LM request — check, load, parallelise, generate, report.

The embedded models speak the passkey task's vocabulary (`paragen.pipelines.llm.passkey`): their prompt is
a passkey prompt of `context` tokens with the key at `depth`, and the report says whether the answer
is the key. A local checkpoint takes a text prompt (`prompt` or `prompt_file`), tokenised by the
checkpoint's own tokenizer. `--kv speculative` decodes by lossless hierarchical speculative decoding
(`paragen.pipelines.llm.speculative`), optionally with a draft model (`--draft`) sharing the tokenizer.
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
from paragen.parallel.llm.config import FULL_CACHE_PLACES, KV_MODES, KVConfig, SpeculativeConfig
from paragen.pipelines import registry
from paragen.pipelines.dtypes import check_dtype, resolve_dtype
from paragen.pipelines.jobs.batch import open_batch
from paragen.pipelines.jobs.common import Prepared, add_output_arguments, output_stem
from paragen.pipelines.llm.loading import EMBEDDED_LLMS, build_llm, check_llm_source, model_root
from paragen.pipelines.llm.passkey import DIGITS, PasskeyPrompt, check_passkey_length, decode_key, make_prompt
from paragen.pipelines.llm.runtime import LLMRuntime, check_prompt_length
from paragen.pipelines.llm.speculative import check_draft, generate_speculative
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
    top_p: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # float32 on CPU, bfloat16/float16 on a GPU
    allow_pickle: bool = False
    allow_remote_code: bool = False
    draft: str | None = None  # --kv speculative: the draft model (embedded name or local directory)
    out_dir: str = "out"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.context < 1 or self.new_tokens < 1:
            raise ValueError(f"context and new tokens must be positive, got {self.context} and {self.new_tokens}")
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {self.depth}")
        if self.temperature <= 0 or (self.top_k is not None and self.top_k < 1) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"temperature must be > 0, top-k >= 1 and top-p in (0, 1]; got {self.temperature}, "
                             f"{self.top_k} and {self.top_p}")
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


@dataclass
class LoadedLLM:
    """What `load` hands `generate`: the parallelised model's runtime and the draft model (speculative)."""

    runtime: LLMRuntime
    draft: torch.nn.Module | None


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
    p.add_argument("--top-p", type=float, default=defaults.top_p,
                   help="sample from the most likely tokens whose mass reaches p (nucleus sampling)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (prompt and sampling)")
    p.add_argument("--seq", type=int, default=-1, help="sequence shards (-1: the ranks / --tp)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per shard (DeepSpeed AutoTP)")
    p.add_argument("--kv", choices=KV_MODES, default=kv.mode,
                   help="dense: exact K/V on the device; offload: ShadowKV — low-rank keys, values in host memory, "
                        "top-k chunks fetched per token; speculative: TriForce — the dense cache verifies tokens "
                        "drafted by the model over a small retrieval cache (lossless)")
    p.add_argument("--budget", type=float, default=kv.budget, help="offload: fraction of the context fetched per token")
    p.add_argument("--rank", type=int, default=None, help="offload: SVD rank of the keys (default: 160/1024 of the key width)")
    p.add_argument("--chunk", type=int, default=kv.chunk, help="offload: tokens per chunk")
    p.add_argument("--window", type=int, default=kv.window, help="offload: most recent prompt tokens kept exact")
    spec = kv.speculative
    p.add_argument("--gamma", type=int, default=spec.gamma, help="speculative: tokens drafted per verification")
    p.add_argument("--retrieval-budget", type=int, default=spec.budget,
                   help="speculative: tokens of the retrieval cache (sink, recent window and top chunks over the whole "
                        "context); at most the prompt")
    p.add_argument("--refresh-every", type=int, default=spec.refresh_every,
                   help="speculative: rebuild the retrieval cache every N verifications (0: never)")
    p.add_argument("--refresh-below", type=float, default=spec.refresh_below,
                   help="speculative: rebuild it when the acceptance rate since the last build falls below this (0: never)")
    p.add_argument("--draft", default=None,
                   help="speculative: a draft model sharing the tokenizer (e.g. tiny-passkey-draft, or a local "
                        "directory), with a StreamingLLM cache, drafting for the retrieval level")
    p.add_argument("--draft-gamma", type=int, default=spec.draft_gamma,
                   help="speculative: tokens the draft model drafts per check by the retrieval level")
    p.add_argument("--full-cache", choices=FULL_CACHE_PLACES, default=spec.full_cache,
                   help="speculative: where each rank keeps its shard's exact K/V — device, or host memory (the "
                        "offloaded setting: streamed to the device in blocks for each verification)")
    p.add_argument("--allow-remote-code", action="store_true",
                   help="allow a checkpoint whose config names remote code (auto_map), which runs arbitrary Python")
    add_output_arguments(p, defaults.out_dir, "the JSON run report")


def prepare(args: argparse.Namespace, launch) -> Prepared:
    """Check the request against the model and build its prompt, before any collective (same on every rank)."""
    request = LLMRequest(
        model=args.model, prompt=args.prompt, prompt_file=args.prompt_file, context=args.context, depth=args.depth,
        new_tokens=args.new_tokens, sample=args.sample, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, dtype=args.dtype, allow_pickle=args.allow_pickle,
        allow_remote_code=args.allow_remote_code, draft=args.draft, out_dir=args.out, name=args.name,
    )
    speculative = SpeculativeConfig(gamma=args.gamma, budget=args.retrieval_budget, refresh_every=args.refresh_every,
                                    refresh_below=args.refresh_below, draft_gamma=args.draft_gamma,
                                    full_cache=args.full_cache)
    options = KVConfig(mode=args.kv, budget=args.budget, rank=args.rank, chunk=args.chunk, window=args.window,
                       speculative=speculative)
    class_name = check_llm_source(request.model, allow_pickle=request.allow_pickle,
                                  allow_remote_code=request.allow_remote_code)
    workload = registry.find_for_job("llm", class_name, options, request.model)
    config = workload.resolve(ParallelConfig(seq=args.seq, tp=args.tp), launch.world_size)
    from transformers import AutoConfig

    root = model_root(request.model)
    model_config = AutoConfig.from_pretrained(root, local_files_only=True, trust_remote_code=request.allow_remote_code)
    workload.check(model_config, config, options)
    draft_positions = _check_speculative(request, options, model_config)
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
        if options.mode == "speculative":
            options.speculative.check_context(ids.shape[1])
            if draft_positions is not None:
                check_prompt_length(ids.shape[1], one.new_tokens, draft_positions, 1)
        return Prompted(one, ids, passkey, tokenizer)

    batch = open_batch(args, launch, request, prompt)
    if batch is not None:
        return Prepared(request, workload, config, options, prompt, batch=batch)
    return Prepared(request, workload, config, options, prompt, item=prompt(request))


def _check_speculative(request: LLMRequest, options: KVConfig, model_config) -> int | None:
    """Refuse speculative options that cannot run (same answer on every rank, before any collective); the draft
    model's positions, if there is one."""
    if options.mode != "speculative":
        if request.draft is not None:
            raise ValueError("--draft drafts for speculative decoding: add --kv speculative")
        if options.speculative.full_cache != "device":
            raise ValueError("--full-cache places speculative decoding's full cache: add --kv speculative")
        return None
    if request.top_k is not None:
        raise ValueError("--kv speculative samples with --temperature and --top-p, not --top-k")
    if request.draft is None:
        return None
    check_llm_source(request.draft, allow_pickle=request.allow_pickle)
    from transformers import AutoConfig

    draft_config = AutoConfig.from_pretrained(model_root(request.draft), local_files_only=True)
    check_draft(model_config, draft_config, _same_tokenizer(request.model, request.draft))
    return draft_config.max_position_embeddings


def _same_tokenizer(model: str, draft: str) -> bool:
    """Whether `draft` reads the tokens `model` does: both embedded (the passkey vocabulary), or both local with
    the same tokenizer vocabulary."""
    if (model in EMBEDDED_LLMS) != (draft in EMBEDDED_LLMS):
        return False
    if model in EMBEDDED_LLMS:
        return True
    from transformers import AutoTokenizer

    vocabularies = [AutoTokenizer.from_pretrained(model_root(name), local_files_only=True).get_vocab()
                    for name in (model, draft)]
    return vocabularies[0] == vocabularies[1]


def load(job: Prepared) -> LoadedLLM:
    """The job's model on this rank's device, parallelised, and the draft model if asked for."""
    request = job.request
    model = build_llm(request.model, dtype=resolve_dtype(request.dtype), device=rank_device(),
                      allow_pickle=request.allow_pickle, allow_remote_code=request.allow_remote_code)
    draft = None
    if request.draft is not None:
        draft = build_llm(request.draft, dtype=resolve_dtype(request.dtype), device=rank_device(),
                          allow_pickle=request.allow_pickle)
    return LoadedLLM(job.workload.install(model, job.config, job.options).paragen, draft)


def generate(job: Prepared, loaded: LoadedLLM, prompted: Prompted, load_s: float) -> dict | None:
    """One completion on every rank; the output rank writes the JSON report and returns it."""
    log = get_logger()
    request = prompted.request
    runtime = loaded.runtime
    model = runtime.model  # tensor parallelism may hand back the sharded module
    began = time.perf_counter()
    ids = prompted.ids.to(rank_device())
    speculative = None
    if job.options.mode == "speculative":
        result = generate_speculative(model, ids, max_new_tokens=request.new_tokens, do_sample=request.sample,
                                      temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                                      draft_model=loaded.draft)
        out, cache, speculative = result.sequences, result.cache, result.stats.report()
        retrieval_bytes = result.retrieval.device_bytes() if result.retrieval is not None else 0
    else:
        cache = runtime.new_cache()
        torch.manual_seed(request.seed)
        sampling = {"do_sample": True, "temperature": request.temperature, "top_k": request.top_k,
                    "top_p": request.top_p if request.top_p < 1 else None} if request.sample \
            else {"do_sample": False, "top_k": None, "top_p": None}
        try:
            out = model.generate(ids, **cache_argument(cache), max_new_tokens=request.new_tokens, **sampling)
        finally:
            cache.close()
    generated = time.perf_counter()
    new = out[0, prompted.ids.shape[1]:].tolist()
    decoded = max(1, len(new) - 1)  # tokens decoded after the prefill's
    kv_report = {"device_bytes": cache.device_bytes(), "host_bytes": cache.host_bytes(),
                 "fetched_bytes_per_token": cache.fetched_bytes() / decoded,
                 "fetch_wait_ms_per_token": 1000 * cache.fetch_overlap_s()[1] / decoded}
    if speculative is not None:
        kv_report.update(retrieval_bytes=retrieval_bytes)  # the drafting rank's retrieval cache (0 elsewhere)
    kv_per_rank = all_gather_objects(runtime.mesh.group("world"), kv_report)
    report = job_report("llm", asdict(request), model, job.workload, job.options, load_s=load_s,
                        generate_s=generated - began)
    if report is None:
        return None
    if speculative is not None:  # the tokens after the prefill's came from rounds of drafting and verification
        decode_s = speculative["draft_s"] + speculative["verify_s"] + speculative["refresh_s"]
        tokens_per_s = (len(new) - 1) / decode_s if decode_s and len(new) > 1 else None
    else:
        decode = runtime.step_seconds
        tokens_per_s = len(decode) / sum(decode) if decode else None
    report.update(
        prompt_tokens=prompted.ids.shape[1], new_tokens=new, prefill_s=runtime.prefill_s,
        decode_tokens_per_s=tokens_per_s, kv_per_rank={str(rank): value for rank, value in enumerate(kv_per_rank)},
    )
    if speculative is not None:
        report.update(speculative=speculative)
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

"""`paragen llm`: one causal-LM request — check, load, parallelise, generate, report.

The embedded models speak the passkey task's vocabulary (`paragen.pipelines.llm.passkey`), and ship a tokenizer
that reads and writes it as text: their prompt is text (`prompt`, `prompt_file`, chat `messages`) or, given none,
a passkey prompt of `context` tokens with the key at `depth` (`--print-prompt` shows it as text); the report says
whether the answer is the key whenever the prompt holds one. A local checkpoint takes text, tokenised by its own
tokenizer (`llm_text`). `--kv speculative` decodes by lossless hierarchical speculative decoding
(`paragen.pipelines.llm.speculative`), optionally with a draft model (`--draft`) sharing the tokenizer.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from paragen.comms import all_gather_objects, rank_device
from paragen.log import get_logger
from paragen.parallel.llm.cache import cache_argument
from paragen.parallel.llm.config import FULL_CACHE_PLACES, KV_MODES, KVConfig, SpeculativeConfig
from paragen.parallel.interrupt import Watch, check_interrupt
from paragen.pipelines import registry
from paragen.pipelines.dtypes import DtypeName, resolve_dtype
from paragen.pipelines.jobs import fields, schema
from paragen.pipelines.jobs.batch import request_file
from paragen.pipelines.jobs.common import Prepared, add_output_arguments, output_stem
from paragen.pipelines.jobs.schema import LAUNCH, LOCAL, MAX_SEED, field, request_class
from paragen.pipelines.llm.loading import EMBEDDED_LLMS, build_llm, check_llm_source, model_root
from paragen.pipelines.jobs.llm_text import Message, Prompted, has_text, prompt_ids
from paragen.pipelines.llm.passkey import DIGITS, check_passkey_length, decode_key
from paragen.pipelines.llm.runtime import LLMRuntime, check_prompt_length
from paragen.pipelines.llm.speculative import check_draft, generate_speculative
from paragen.pipelines.outputs import check_out_dir, save_json
from paragen.pipelines.report import job_report

MAX_POSITIONS = 1 << 26  # tokens; a bound before the model's own positions
MAX_MESSAGES = 4096  # chat messages of one request
MADE_ALONE = ("its caches hold one sequence: the ring-sharded KV cache, ShadowKV's low-rank keys and chunk index, and "
              "the speculative draft's cache are built for one prompt's rows")  # why `serve llm` does not batch


@request_class
class LLMRequest:
    """Everything `paragen llm` was asked for (one declaration per field, see `schema`)."""

    model: str = fields.model("tiny-passkey", f"embedded model ({', '.join(EMBEDDED_LLMS)}: passkey prompts) or a "
                                              "local transformers Llama/Qwen2/Mistral directory (safetensors) with "
                                              "its tokenizer, or a Hugging Face Hub id org/name[@revision]")
    prompt: str | None = field(None, "text prompt")
    prompt_file: str | None = field(None, "read the text prompt from this file", scope=LOCAL)
    messages: tuple[Message, ...] | None = field(None, "chat messages, rendered by the tokenizer's chat template",
                                                 cli=False, min_length=1, max_length=MAX_MESSAGES)
    context: int = field(4096, "embedded models without a text prompt: tokens of the passkey prompt made (with "
                               "--new-tokens, at most the model's positions)", gt=0, le=MAX_POSITIONS)
    depth: float = field(0.5, "embedded models without a text prompt: where the key sits, 0 (start) to 1 (end)",
                         ge=0, le=1)
    new_tokens: int = field(16, "tokens to generate", gt=0, le=MAX_POSITIONS)
    sample: bool = field(False, "sample instead of greedy decoding (same seed on every rank)")
    temperature: float = field(1.0, "sampling temperature", gt=0, le=100)
    top_k: int | None = field(None, "sample from the k most likely tokens", ge=1)
    top_p: float = field(1.0, "sample from the most likely tokens whose mass reaches p (nucleus sampling)", gt=0,
                         le=1)
    seed: int = field(0, "random seed (prompt and sampling)", ge=0, le=MAX_SEED)
    dtype: DtypeName = fields.dtype()
    allow_pickle: bool = fields.allow_pickle()
    allow_remote_code: bool = field(False, "allow a checkpoint whose config names remote code (auto_map), which runs "
                                           "arbitrary Python", scope=LAUNCH)
    draft: str | None = field(None, "speculative: a draft model sharing the tokenizer (e.g. tiny-passkey-draft, or a "
                                    "local directory), with a StreamingLLM cache, drafting for the retrieval level",
                              scope=LAUNCH)
    out_dir: str = fields.out_dir("the JSON run report")
    name: str | None = fields.name()

    def __post_init__(self) -> None:
        given = [name for name in ("prompt", "prompt_file", "messages") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one prompt: {' or '.join(given)}, not both")
        if self.model not in EMBEDDED_LLMS and not given:
            raise ValueError("a local checkpoint needs a text prompt: --prompt or --prompt-file (or chat messages)")
        if not given:
            check_passkey_length(self.context)


@dataclass
class LoadedLLM:
    """What `load` hands `generate`: the parallelised model's runtime and the draft model (speculative)."""

    runtime: LLMRuntime
    draft: torch.nn.Module | None


REQUEST_OPTIONS = ("model", "prompt", "prompt_file", "context", "depth", "new_tokens", "sample", "temperature",
                   "top_k", "top_p", "seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `paragen llm`."""
    kv = KVConfig()
    p.description = ("Generate from one long prompt with its sequence cut into shards, one per ring position, "
                     "each shard's weights optionally split by tensor parallelism.")
    schema.add_arguments(p, LLMRequest, REQUEST_OPTIONS)
    registry.add_degree_arguments(p, "llm")
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
    schema.add_arguments(p, LLMRequest, ("draft",))
    p.add_argument("--draft-gamma", type=int, default=spec.draft_gamma,
                   help="speculative: tokens the draft model drafts per check by the retrieval level")
    p.add_argument("--full-cache", choices=FULL_CACHE_PLACES, default=spec.full_cache,
                   help="speculative: where each rank keeps its shard's exact K/V — device, or host memory (the "
                        "offloaded setting: streamed to the device in blocks for each verification)")
    schema.add_arguments(p, LLMRequest, ("allow_remote_code",))
    p.add_argument("--print-prompt", action="store_true",
                   help="print the passkey prompt of --context, --depth and --seed as text, and exit (no ranks)")
    add_output_arguments(p, LLMRequest)


def prepare(args: argparse.Namespace, launch) -> Prepared:
    """Check the request against the model and build its prompt, before any collective (same on every rank)."""
    request = schema.from_arguments(LLMRequest, args)
    speculative = SpeculativeConfig(gamma=args.gamma, budget=args.retrieval_budget, refresh_every=args.refresh_every,
                                    refresh_below=args.refresh_below, draft_gamma=args.draft_gamma,
                                    full_cache=args.full_cache)
    options = KVConfig(mode=args.kv, budget=args.budget, rank=args.rank, chunk=args.chunk, window=args.window,
                       speculative=speculative)
    class_name = check_llm_source(request.model, allow_pickle=request.allow_pickle,
                                  allow_remote_code=request.allow_remote_code)
    workload = registry.find_for_job("llm", class_name, options, request.model)
    config = workload.resolve(registry.degrees_of(args, "llm"), launch.world_size)
    from transformers import AutoConfig

    root = model_root(request.model)
    model_config = AutoConfig.from_pretrained(root, local_files_only=True, trust_remote_code=request.allow_remote_code)
    workload.check(model_config, config, options)
    draft_positions = _check_speculative(request, options, model_config)
    check_out_dir(request.out_dir)
    positions = model_config.max_position_embeddings
    tokenizer = load_tokenizer(request.model, request.allow_remote_code)

    def prompt(one: LLMRequest) -> Prompted:
        """The request's token ids, bounded by the model's positions before they are made."""
        ids, key = prompt_ids(one, tokenizer, positions, config.seq)
        if options.mode == "speculative":
            options.speculative.check_context(ids.shape[1])
            if draft_positions is not None:
                check_prompt_length(ids.shape[1], one.new_tokens, draft_positions, 1)
        return Prompted(one, ids, key, tokenizer)

    prepared = Prepared(request, workload, config, options, prompt, batch=request_file(args, launch),
                        content=lambda prompted: hashlib.sha256(prompted.ids.numpy().tobytes()).hexdigest())
    return prepared if prepared.batch is not None else dataclasses.replace(prepared, item=prompt(request))


def load_tokenizer(model: str, allow_remote_code: bool = False) -> Any:
    """The tokenizer of an embedded model (the passkey world's, shipped beside it) or of a local checkpoint."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_root(model), local_files_only=True, trust_remote_code=allow_remote_code)


def standalone(args: argparse.Namespace) -> str | None:
    """What `paragen llm` answers without the ranks: `--print-prompt`, the passkey prompt `--context`, `--depth` and
    `--seed` make, as text."""
    if not args.print_prompt:
        return None
    request = schema.from_arguments(LLMRequest, args)
    if has_text(request):
        raise ValueError("--print-prompt prints the passkey prompt that --context, --depth and --seed make; drop the "
                         "text prompt")
    check_llm_source(request.model)
    tokenizer = load_tokenizer(request.model)
    ids, _ = prompt_ids(request, tokenizer, MAX_POSITIONS, 1)
    return tokenizer.decode(ids[0], skip_special_tokens=True)


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


class Follow(StoppingCriteria):
    """After every decoded token (every rank decodes as many): the watch's interrupt, asked; its `on_tokens`, handed
    the new token. Never stops the decode itself."""

    def __init__(self, watch: Watch, prompt_length: int) -> None:
        self.watch, self.prompt_length, self.sent = watch, prompt_length, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        check_interrupt(self.watch.interrupt, "after %d new tokens", input_ids.shape[1] - self.prompt_length)
        if self.watch.on_tokens is not None:
            self.watch.on_tokens(input_ids[0, self.sent:].tolist())
            self.sent = input_ids.shape[1]
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


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


def generate(job: Prepared, loaded: LoadedLLM, prompted: Prompted, load_s: float,
             watch: Watch | None = None) -> dict | None:
    """One completion on every rank; the output rank writes the JSON report and returns it. The `watch` may stop it
    between tokens and receives the tokens as they are decided."""
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
                                      draft_model=loaded.draft, watch=watch)
        out, cache, speculative = result.sequences, result.cache, result.stats.report()
        retrieval_bytes = result.retrieval.device_bytes() if result.retrieval is not None else 0
    else:
        cache = runtime.new_cache()
        torch.manual_seed(request.seed)
        sampling = {"do_sample": True, "temperature": request.temperature, "top_k": request.top_k,
                    "top_p": request.top_p if request.top_p < 1 else None} if request.sample \
            else {"do_sample": False, "top_k": None, "top_p": None}
        follow = {} if watch is None else {"stopping_criteria": StoppingCriteriaList([Follow(watch, ids.shape[1])])}
        try:
            out = model.generate(ids, **cache_argument(cache), max_new_tokens=request.new_tokens, **sampling, **follow)
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
        text=prompted.tokenizer.decode(new, skip_special_tokens=True),
        finish_reason="length" if len(new) >= request.new_tokens else "stop",  # an end-of-sequence token came first
    )
    if speculative is not None:
        report.update(speculative=speculative)
    if prompted.key is not None:
        answer = decode_key(new[:DIGITS])
        report.update(passkey=prompted.key, answer=answer, correct=answer == prompted.key)
        log.info("passkey %s in %d tokens: answered %s (%s)", prompted.key, prompted.ids.shape[1], answer,
                 "correct" if report["correct"] else "wrong")
    log.info("generated: %s", report["text"])
    stem = output_stem(request, job, f"{prompted.ids.shape[1]}tok")
    path = save_json(report, Path(request.out_dir) / f"{stem}.json")
    log.info("prefill %.2f s, decode %.1f tokens/s; wrote %s", runtime.prefill_s, report["decode_tokens_per_s"] or 0, path)
    return report

"""The timing part of `bench/gpu_check.py`: real model sizes with random weights (`--tiny`: small stand-ins).

    python bench/gpu_timing.py {ceilings,sdxl,flux,llm} --device cuda --dtype bfloat16 --result out.json [--tiny]

Every figure is the median (with p10/p90 and n) of at least `--reps` timed calls after `--warmup` untimed
ones; on CUDA each call is bracketed by CUDA events (`time_calls`), and per-step clocks synchronise the
device before reading the host clock. The models are built directly on the device from the config dicts
below (no download): weights are random, so images and tokens are meaningless, the arithmetic is the real one.

- ceilings: a large bf16 matrix product, a device-to-device copy and a pinned host-to-device copy (the
  ceilings the other figures are read against).
- sdxl: an SDXL-shaped UNet (`SDXL_UNET`, stabilityai/stable-diffusion-xl-base-1.0's unet config) forward at
  1024² with a CFG batch of 2, and on one rank's band of 2048² at 4 ranks (a quarter-height latent band: an
  approximation of the per-rank compute of patch parallelism, without its halo exchange and with
  self-attention over the band's own keys only, where patch parallelism attends over all rows' keys); then
  an SDXL pipeline around that UNet (SDXL-shaped text encoders and VAE, the embedded tokenizers) timed per
  denoising step stock, then after `paragen.parallelize` at world size 1 (the overhead figure).
- flux: a FLUX.1-dev-shaped transformer (19 double + 38 single blocks, 3072 wide) forward at 1024²
  (4096 image + 512 text tokens); with too little device memory, fewer blocks and a scaled estimate.
- llm: a Llama-3-8B-shaped model (its widths, 4 layers) at a 32K-token prompt: `generate` with transformers'
  DynamicCache (stock), and through paragen at 1 rank with the dense and the offloaded (ShadowKV) KV store, and
  speculative decoding (TriForce: retrieval budget 4096, gamma 6) with the full cache on the device and in host
  memory: prefill seconds and decode tokens/s, requests interleaved across the modes; for the speculative modes
  the draft and verification seconds per round and the acceptance (random weights: low, so these are per-token
  costs, not the speedup of a trained model), and whether their tokens equal dense's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPT, spread  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
SDXL_UNET_TINY = dict(SDXL_UNET, attention_head_dim=[1, 2, 4], block_out_channels=[32, 64, 128], cross_attention_dim=64,
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, layers_per_block=1,
                      transformer_layers_per_block=[1, 1, 1], sample_size=16)
# CLIP ViT-L/14 and OpenCLIP bigG/14 text towers (the vocabulary is the embedded tokenizer's)
SDXL_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "hidden_act": "quick_gelu", "projection_dim": 768, "max_position_embeddings": 77}
SDXL_TEXT_2 = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
               "hidden_act": "gelu", "projection_dim": 1280, "max_position_embeddings": 77}
SDXL_TEXT_TINY = dict(SDXL_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32)
SDXL_TEXT_2_TINY = dict(SDXL_TEXT_2, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32)
SDXL_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "latent_channels": 4, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025}
SDXL_VAE_TINY = dict(SDXL_VAE, block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=128)

# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
            "axes_dims_rope": [16, 56, 56]}
FLUX_TINY = dict(FLUX_DEV, num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])

# meta-llama/Meta-Llama-3-8B's widths, 4 of its 32 layers
LLAMA3_8B_4L = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 4,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "tie_word_embeddings": False,
                "attention_bias": False, "mlp_bias": False, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
LLAMA_TINY = dict(LLAMA3_8B_4L, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


# ---- measuring ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, reps: int) -> dict:
    """Seconds per call of `fn`: median, p10, p90, n over `reps` calls after `warmup` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return spread(times)


def count_flops(fn) -> float | None:
    """Floating-point operations of one call of `fn` by PyTorch's FLOP counter (None where it fails)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - a missing count is not a failed timing
        return None


def with_rate(timing: dict, flops: float | None) -> dict:
    timing = dict(timing, flops=flops)
    if flops:
        timing["tflops_per_s"] = flops / timing["median"] / 1e12
    return timing


def build(factory, device: torch.device, dtype: torch.dtype, cast: bool = True):
    """`factory()` constructed directly on `device` with `dtype` as the default (no host copy of the weights);
    `cast`: then every floating-point parameter and buffer to `dtype` (diffusers models; transformers' keep theirs)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = factory()
    finally:
        torch.set_default_dtype(previous)
    # nn.Module.to, not diffusers' ModelMixin.to (which warns on every dtype cast): buffers made in float32 follow
    return torch.nn.Module.to(module, dtype=dtype).eval() if cast else module.eval()


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}


class StepClock:
    """Diffusers' step-end callback: stamps each denoising step after synchronising the device."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def start(self) -> None:
        self.stamps = []
        self._mark()

    def __call__(self, pipeline, step, timestep, callback_kwargs):
        self._mark()
        return callback_kwargs

    def _mark(self) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    @property
    def step_s(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


# ---- sections ------------------------------------------------------------------------------------------------
def ceilings(args, device, dtype) -> dict:
    n = 512 if args.tiny else 8192
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    mm = time_calls(lambda: a @ b, device, args.warmup, max(args.reps, 10))
    out = {"matmul": dict(mm, size=n, dtype=str(dtype).removeprefix("torch."), tflops_per_s=2 * n**3 / mm["median"] / 1e12)}
    del a, b
    size = (64 if args.tiny else 2048) * 2**20
    src = torch.randn(size // 4, device=device, generator=gen)
    dst = torch.empty_like(src)
    cp = time_calls(lambda: dst.copy_(src), device, args.warmup, max(args.reps, 10))
    out["device_copy"] = dict(cp, bytes=size, gb_per_s_read_plus_write=2 * size / cp["median"] / 1e9)
    if device.type == "cuda":
        host = torch.randn(size // 8 // 4).pin_memory()
        target = torch.empty(host.shape, device=device)
        h2d = time_calls(lambda: target.copy_(host, non_blocking=True), device, args.warmup, max(args.reps, 10))
        out["pinned_host_to_device"] = dict(h2d, bytes=host.numel() * 4, gb_per_s=host.numel() * 4 / h2d["median"] / 1e9)
    return out


def _unet_inputs(unet, batch: int, rows: int, cols: int, size: int, device, dtype, gen):
    config = unet.config
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "sample": torch.randn(batch, config.in_channels, rows, cols, device=device, dtype=dtype, generator=gen),
        "timestep": torch.full((batch,), 500.0, device=device),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, device=device, dtype=dtype, generator=gen),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, text_dim, device=device, dtype=dtype, generator=gen),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype),
        },
    }


def sdxl(args, device, dtype) -> dict:
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import paragen
    from paragen.pipelines.loading import load_pipeline

    tiny = args.tiny
    size = 128 if tiny else 1024
    latent = size // 8
    out: dict = {"size": size, "batch": 2, "unet_config": "tiny SDXL-shaped" if tiny else "SDXL base 1.0 (random weights)",
                 "diffusers": diffusers.__version__}
    started = time.perf_counter()
    unet = build(lambda: UNet2DConditionModel(**(SDXL_UNET_TINY if tiny else SDXL_UNET)), device, dtype)
    out.update(unet_params=params(unet), build_s=time.perf_counter() - started)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        full = _unet_inputs(unet, 2, latent, latent, size, device, dtype, gen)
        call = lambda: unet(**full, return_dict=False)[0]  # noqa: E731
        first = call()
        out["unet_output_finite"] = bool(torch.isfinite(first).all())
        out["unet_full"] = with_rate(time_calls(call, device, args.warmup, args.reps), count_flops(call))
        # One rank's band of 2 × size at 4 ranks: a quarter of the rows of a latent twice as wide.
        band = _unet_inputs(unet, 2, 2 * latent // 4, 2 * latent, 2 * size, device, dtype, gen)
        band_call = lambda: unet(**band, return_dict=False)[0]  # noqa: E731
        out["unet_band_of_4"] = with_rate(time_calls(band_call, device, args.warmup, args.reps), count_flops(band_call))
        out["unet_band_of_4"]["note"] = (f"UNet forward on a {2 * latent // 4}x{2 * latent} latent band, one rank's share of "
                                         f"{2 * size}² at 4 ranks: approximates the per-rank compute (no halo exchange; "
                                         "self-attention over the band's keys, where patch parallelism attends over every row's)")
        del full, band, first

    # The pipeline around that UNet: stock, then paragen at world size 1 (per denoising step, CFG 5).
    embedded = load_pipeline("tiny-sdxl")
    ids = {k: getattr(embedded.text_encoder.config, k) for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    text_1 = build(lambda: CLIPTextModel(CLIPTextConfig(**(SDXL_TEXT_TINY if tiny else SDXL_TEXT), **ids)), device, dtype,
                   cast=False)
    text_2 = build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**(SDXL_TEXT_2_TINY if tiny else SDXL_TEXT_2), **ids)),
                   device, dtype, cast=False)
    vae = build(lambda: AutoencoderKL(**(SDXL_VAE_TINY if tiny else SDXL_VAE)), device, dtype)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_1, text_encoder_2=text_2, tokenizer=embedded.tokenizer,
                                     tokenizer_2=embedded.tokenizer_2, unet=unet, scheduler=embedded.scheduler)
    pipe.set_progress_bar_config(disable=True)
    clock = StepClock(device)
    steps = max(args.reps, 5 if tiny else 10)

    def request(count: int):
        return pipe(PROMPT, height=size, width=size, num_inference_steps=count, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=clock).images

    def timed() -> tuple[list[float], torch.Tensor]:
        request(2)  # warm-up request
        clock.start()
        latents = request(steps + 1)
        return clock.step_s[1:], latents  # the first interval also encodes the prompt

    stock_steps, stock_latents = timed()
    paragen.parallelize(pipe, paragen.ParallelConfig())
    paragen_steps, paragen_latents = timed()
    stock, para = spread(stock_steps), spread(paragen_steps)
    out["pipeline_step_stock"] = stock
    out["pipeline_step_paragen_1rank"] = para
    out["paragen_overhead"] = para["median"] / stock["median"] - 1.0
    out["paragen_overhead_note"] = ("median denoising step (UNet at CFG batch 2 + scheduler), stock pipeline first, then the "
                                    "same pipeline after paragen.parallelize at world size 1; goal <= 3%")
    out["latents_max_abs_diff_stock_vs_paragen"] = float((stock_latents.float() - paragen_latents.float()).abs().max())
    out["latents_finite"] = bool(torch.isfinite(paragen_latents).all())
    out.update(memory(device))
    return out


def _flux_inputs(config: dict, size: int, text_tokens: int, device, dtype, gen):
    side = size // 16  # VAE factor 8, then 2×2 patches packed into tokens
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    return {
        "hidden_states": torch.randn(1, side * side, config["in_channels"], device=device, dtype=dtype, generator=gen),
        "encoder_hidden_states": torch.randn(1, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype, generator=gen),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype, generator=gen),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "guidance": torch.full((1,), 3.5, device=device, dtype=dtype),
        "img_ids": ids.reshape(-1, 3).to(dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
    }


def flux(args, device, dtype) -> dict:
    from diffusers import FluxTransformer2DModel

    config = dict(FLUX_TINY if args.tiny else FLUX_DEV)
    size, text_tokens = (128, 16) if args.tiny else (1024, 512)
    out: dict = {"size": size, "image_tokens": (size // 16) ** 2, "text_tokens": text_tokens,
                 "config": "tiny Flux-shaped" if args.tiny else "FLUX.1-dev (random weights)"}
    with torch.device("meta"):
        full_blocks = {"double": config["num_layers"], "single": config["num_single_layers"]}
        shape = FluxTransformer2DModel(**config)
        block_params = {"double": params(shape.transformer_blocks[0]), "single": params(shape.single_transformer_blocks[0])}
        total = params(shape)
    del shape
    needed = total * torch.finfo(dtype).bits // 8
    scale = 1.0
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        out["free_gib_before"] = free / 2**30
        if needed > 0.7 * free:  # weights plus activations must fit: keep the block ratio, scale the estimate
            fraction = 0.5 * free / needed
            config["num_layers"] = max(1, int(full_blocks["double"] * fraction))
            config["num_single_layers"] = max(1, int(full_blocks["single"] * fraction))
            kept = config["num_layers"] * block_params["double"] + config["num_single_layers"] * block_params["single"]
            scale = (full_blocks["double"] * block_params["double"] + full_blocks["single"] * block_params["single"]) / kept
    out.update(params=total, blocks=full_blocks, blocks_run={"double": config["num_layers"], "single": config["num_single_layers"]})
    started = time.perf_counter()
    model = build(lambda: FluxTransformer2DModel(**config), device, dtype)
    out["build_s"] = time.perf_counter() - started
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        inputs = _flux_inputs(config, size, text_tokens, device, dtype, gen)
        call = lambda: model(**inputs, return_dict=False)[0]  # noqa: E731
        first = call()
        out["output_finite"] = bool(torch.isfinite(first).all())
        out["forward"] = with_rate(time_calls(call, device, args.warmup, args.reps), count_flops(call))
    if scale != 1.0:
        out["forward_estimate_full_s"] = out["forward"]["median"] * scale
        out["scaled_note"] = (f"ran {config['num_layers']} double + {config['num_single_layers']} single blocks (device memory); "
                              f"the full model's time is estimated ×{scale:.2f} by block parameters")
    out.update(memory(device))
    return out


class TokenClock:
    """A logits processor that stamps (after synchronising the device) each time `generate` has a token's logits."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def llm(args, device, dtype) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LogitsProcessorList

    import paragen
    from paragen.parallel.llm import KVConfig, SpeculativeConfig, cache_argument
    from paragen.pipelines.llm import check, parallelize_llm
    from paragen.pipelines.llm.speculative import generate_speculative

    tiny = args.tiny
    context = 512 if tiny else 32768
    new_tokens = 8 if tiny else 16
    config = LlamaConfig(**(LLAMA_TINY if tiny else LLAMA3_8B_4L))
    out: dict = {"context": context, "new_tokens": new_tokens,
                 "config": "tiny Llama" if tiny else "Llama-3-8B widths, 4 layers (random weights)"}
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to(device).eval()
    out.update(params=params(model), build_s=time.perf_counter() - started)
    runtime = parallelize_llm(model, paragen.ParallelConfig(seq=1), KVConfig(mode="dense"))
    spec = SpeculativeConfig(budget=256 if tiny else 4096)
    kv_modes = {"dense": KVConfig(mode="dense"), "offload": KVConfig(mode="offload"),
                "speculative": KVConfig(mode="speculative", speculative=spec),
                "speculative_host": KVConfig(mode="speculative", speculative=dataclasses.replace(spec, full_cache="host"))}
    for kv in kv_modes.values():
        check(model.config, runtime.config, kv)
    ids = torch.randint(0, config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0)).to(device)

    def speculative(mode: str, prompt: torch.Tensor, count: int) -> dict:
        runtime.kv = kv_modes[mode]
        sync(device)
        result = generate_speculative(model, prompt, max_new_tokens=count)
        sync(device)
        stats = result.stats.report()
        cache = result.cache
        _, wait_s = cache.fetch_overlap_s()
        row = {"prefill_s": runtime.prefill_s, "decode_s": result.stats.token_seconds(),
               "tokens": result.sequences[0, prompt.shape[1]:].tolist(), "device_kv_bytes": cache.device_bytes(),
               "host_kv_bytes": cache.host_bytes(), "fetched_bytes": cache.fetched_bytes(),
               "fetch_wait_s": wait_s, "speculative": {k: stats[k] for k in (
                    "acceptance_rate", "verifications", "tokens_per_verification", "draft_s", "verify_s", "refresh_s")}}
        cache.close()
        return row

    def request(mode: str, prompt: torch.Tensor, count: int) -> dict:
        if mode.startswith("speculative"):
            return speculative(mode, prompt, count)
        if mode != "stock":
            runtime.kv = kv_modes[mode]
        cache = DynamicCache() if mode == "stock" else runtime.new_cache()
        clock = TokenClock(device)
        sync(device)
        began = time.perf_counter()
        try:
            result = model.generate(prompt, **cache_argument(cache), max_new_tokens=count, do_sample=False, top_k=None,
                                    top_p=None, logits_processor=LogitsProcessorList([clock]))
        finally:
            if mode != "stock":
                cache.close()
        row = {"prefill_s": clock.stamps[0] - began, "decode_s": [b - a for a, b in zip(clock.stamps, clock.stamps[1:])],
               "tokens": result[0, prompt.shape[1]:].tolist()}
        if mode == "stock":
            row["device_kv_bytes"] = sum(t.numel() * t.element_size() for layer in cache.layers
                                         for t in (layer.keys, layer.values) if t is not None)
        else:
            rebuild_s, wait_s = cache.fetch_overlap_s()
            row.update(device_kv_bytes=cache.device_bytes(), host_kv_bytes=cache.host_bytes(),
                       fetched_bytes=cache.fetched_bytes(), rebuild_s=rebuild_s, fetch_wait_s=wait_s,
                       paragen_prefill_s=runtime.prefill_s, paragen_step_s=list(runtime.step_seconds))
        return row

    modes = ("stock", "dense", "offload", "speculative", "speculative_host")
    deadline = time.monotonic() + args.budget_s
    errors: dict = {}
    for mode in modes:  # warm-up at the full prompt (kernels, allocator, SVD workspaces)
        try:
            request(mode, ids, 2)
        except Exception as error:  # noqa: BLE001 - one mode failing leaves the others' figures
            errors[mode] = f"{type(error).__name__}: {error}"[:1000]
    rows: dict[str, list[dict]] = {m: [] for m in modes if m not in errors}
    for rep in range(args.reps):
        if rep > 0 and time.monotonic() > deadline:
            out["reps_cut"] = f"stopped after {rep} requests per mode: the section's {args.budget_s:.0f} s were spent"
            break
        for mode in list(rows):
            try:
                rows[mode].append(request(mode, ids, new_tokens))
            except Exception as error:  # noqa: BLE001
                errors[mode] = f"{type(error).__name__}: {error}"[:1000]
                rows.pop(mode)
    for mode, done in rows.items():
        if not done:
            continue
        decode = [s for row in done for s in row["decode_s"]]
        entry = {"requests": len(done), "prefill_s": spread([r["prefill_s"] for r in done]), "decode_step_s": spread(decode),
                 "decode_tokens_per_s": 1.0 / spread(decode)["median"], "device_kv_bytes": done[-1]["device_kv_bytes"]}
        for key in ("host_kv_bytes", "fetched_bytes", "rebuild_s", "fetch_wait_s", "speculative"):
            if key in done[-1]:
                entry[key] = done[-1][key]
        if mode in ("dense", "offload"):
            entry["paragen_internal_prefill_s"] = spread([r["paragen_prefill_s"] for r in done])
        entry["tokens_first_request"] = done[0]["tokens"]
        out[mode] = entry
    if "stock" in out and "dense" in out:
        stock, dense = out["stock"], out["dense"]
        out["dense_vs_stock"] = {
            "prefill_overhead": dense["prefill_s"]["median"] / stock["prefill_s"]["median"] - 1.0,
            "decode_overhead": dense["decode_step_s"]["median"] / stock["decode_step_s"]["median"] - 1.0,
            "same_tokens": dense["tokens_first_request"] == stock["tokens_first_request"],
            "note": "paragen at 1 rank with the dense store vs generate with DynamicCache; goal <= 3%",
        }
    for mode in ("speculative", "speculative_host"):
        if mode in out and "dense" in out:
            out[f"{mode}_vs_dense"] = {
                "decode_speedup": out[mode]["decode_tokens_per_s"] / out["dense"]["decode_tokens_per_s"],
                "same_tokens": out[mode]["tokens_first_request"] == out["dense"]["tokens_first_request"]}
    if "offload" in out and "stock" in out:
        out["offload_vs_stock_decode_speedup"] = out["offload"]["decode_tokens_per_s"] / out["stock"]["decode_tokens_per_s"]
    if errors:
        out["errors"] = errors
    out.update(memory(device))
    return out


SECTIONS = {"ceilings": ceilings, "sdxl": sdxl, "flux": flux, "llm": llm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section", choices=list(SECTIONS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--tiny", action="store_true", help="small stand-ins for the real sizes (CPU runs)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="timed calls (at least 5 for a median with p10/p90)")
    p.add_argument("--budget-s", type=float, default=180.0, help="llm: stop repeating requests after this many seconds")
    p.add_argument("--result", required=True)
    args = p.parse_args()

    import paragen

    started = time.perf_counter()
    result: dict = {"section": args.section, "dtype": args.dtype, "tiny": args.tiny}
    # One rank communicates nothing: gloo, so that these figures do not depend on NCCL starting on this machine
    # (the CLI section runs the default NCCL path).
    paragen.init(device=args.device, backend="gloo")
    device, dtype = paragen.rank_device(), getattr(torch, args.dtype)
    result["device"] = str(device)
    try:
        result.update(SECTIONS[args.section](args, device, dtype))
        result["ok"] = True
    except Exception as error:  # noqa: BLE001 - the driver records it
        result.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000], traceback=traceback.format_exc()[-4000:])
    result["seconds"] = time.perf_counter() - started
    Path(args.result).write_text(json.dumps(result, default=str))
    paragen.shutdown()
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()

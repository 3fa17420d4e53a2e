"""Embedded tiny pipelines (build, determinism, tokenizer) and the checks and loader for local checkpoints."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from paragen.pipelines.jobs.image import exact_size_options
from paragen.pipelines.loading import EMBEDDED_MODELS, ModelLoadError, check_model_source, load_pipeline
from paragen.pipelines.model_facts import model_facts

UNET_MODELS = ("tiny-sd", "tiny-sdxl")
CLASSES = {"tiny-sd": "StableDiffusionPipeline", "tiny-sdxl": "StableDiffusionXLPipeline",
           "tiny-pixart": "PixArtSigmaPipeline", "tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline"}


def generate(pipe: DiffusionPipeline, prompt: str = "a red cube on a table") -> torch.Tensor:
    """A 2-step 64x64 image with guidance (CFG batch 2; Flux: guidance embedding), as a [1, 3, 64, 64] tensor."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **exact_size_options(pipe),
    )
    return out.images


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


@pytest.fixture(scope="module", params=list(CLASSES))
def embedded(request: pytest.FixtureRequest) -> tuple[str, DiffusionPipeline, torch.Tensor]:
    pipe = load_pipeline(request.param, seed=0)
    return request.param, pipe, generate(pipe)


def test_embedded_builds_a_non_constant_image(embedded) -> None:
    name, pipe, image = embedded
    assert type(pipe).__name__ == CLASSES[name]
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()
    assert image.std(dim=(2, 3)).min() > 0.02, "image is flat"
    assert ((image > 0.01) & (image < 0.99)).float().mean() > 0.5, "image is saturated"
    assert pipe.vae_scale_factor == 8
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            assert not module.training and module.device.type == "cpu"


@pytest.mark.parametrize("name", UNET_MODELS)
def test_embedded_unet_output_varies_in_space(name: str) -> None:
    pipe = load_pipeline(name, seed=0)
    cfg = pipe.unet.config
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 77, cfg.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    extra = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        time_ids = torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled), "time_ids": time_ids}}
    with torch.no_grad():
        noise = pipe.unet(latents, torch.tensor([500, 500]), text, **extra).sample
    assert noise.shape == latents.shape
    assert noise.std(dim=(2, 3)).min() > 0.05


def test_same_seed_same_image_other_seed_other_weights(embedded) -> None:
    name, _, image = embedded
    again = load_pipeline(name, seed=0)
    assert torch.equal(generate(again), image)
    other = load_pipeline(name, seed=1)
    for a, b in zip(denoiser(again).parameters(), denoiser(other).parameters()):
        if a.dim() > 1:
            assert not torch.equal(a, b)
    embeddings = [p.text_encoder.get_input_embeddings().weight for p in (again, other)]
    assert not torch.equal(*embeddings)


def test_loading_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_pipeline("tiny-sd", seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_dtype_is_applied_to_every_module() -> None:
    pipe = load_pipeline("tiny-sdxl", dtype=torch.bfloat16)
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert len(modules) == 4
    assert all(p.dtype == torch.bfloat16 for m in modules for p in m.parameters())


def _tokenizer_pairs(pipe: DiffusionPipeline) -> list[tuple]:
    """(tokenizer, text encoder) of every text branch of the pipeline."""
    pairs = []
    for suffix in ("", "_2", "_3"):
        tokenizer = getattr(pipe, f"tokenizer{suffix}", None)
        if tokenizer is not None:
            pairs.append((tokenizer, getattr(pipe, f"text_encoder{suffix}")))
    return pairs


@pytest.mark.parametrize("prompt", ["a photo of an astronaut riding a horse", "Ünïcödé 日本語 🐱 «quotes», café"])
def test_clip_tokenizers_round_trip_and_pad(embedded, prompt: str) -> None:
    _, pipe, _ = embedded
    pairs = [(t, e) for t, e in _tokenizer_pairs(pipe) if "CLIP" in type(e).__name__]
    assert pairs or type(pipe).__name__ == "PixArtSigmaPipeline"  # PixArt is T5 only
    for tokenizer, encoder in pairs:
        assert tokenizer.model_max_length == 77 == encoder.config.max_position_embeddings
        assert len(tokenizer) == encoder.config.vocab_size
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77 and max(ids) < encoder.config.vocab_size
        assert ids[0] == tokenizer.bos_token_id == encoder.config.bos_token_id
        n = ids.index(tokenizer.eos_token_id)
        assert tokenizer.eos_token_id == encoder.config.eos_token_id
        assert set(ids[n + 1 :]) == {tokenizer.pad_token_id}
        # CLIP lower-cases and splits punctuation off words, so compare without spaces
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == prompt.lower().replace(" ", "")
        long = tokenizer("word " * 200, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(long) == 77 and long[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("name", ("tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-wan", "tiny-hunyuandit",
                                  "tiny-auraflow", "tiny-allegro"))
def test_t5_tokenizers_round_trip_and_pad(name: str) -> None:
    pipe = load_pipeline(name)
    pairs = [(t, e) for t, e in _tokenizer_pairs(pipe) if "T5" in type(e).__name__]
    assert len(pairs) == 1
    tokenizer, encoder = pairs[0]
    assert len(tokenizer) <= encoder.config.vocab_size
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (encoder.config.pad_token_id, encoder.config.eos_token_id)
    prompt = "a photo of an astronaut riding a horse, 42 times."
    ids = tokenizer(prompt, padding="max_length", max_length=40, truncation=True).input_ids
    n = ids.index(tokenizer.eos_token_id)
    assert len(ids) == 40 and set(ids[n + 1 :]) == {tokenizer.pad_token_id}
    assert tokenizer.unk_token_id not in ids[:n]
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == prompt.replace(" ", "")
    odd = tokenizer("日本語 🐱 «quotes»", padding="max_length", max_length=40).input_ids
    assert len(odd) == 40 and max(odd) < encoder.config.vocab_size


def test_unknown_or_missing_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tiny-sd, tiny-sdxl"):
        check_model_source("no-such-model")
    with pytest.raises(ModelLoadError, match="no such local path"):
        load_pipeline(str(tmp_path / "missing"))
    (tmp_path / "file.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a directory"):
        check_model_source(str(tmp_path / "file.safetensors"))
    with pytest.raises(ModelLoadError, match="model_index.json"):
        check_model_source(str(tmp_path))


def fake_checkpoint(root: Path, weight_file: str | None) -> Path:
    """A pipeline directory with one weighted component whose weights are `weight_file` (a stub)."""
    (root / "unet").mkdir(parents=True)
    (root / "scheduler").mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None]}
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "unet" / "config.json").write_text("{}")
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    if weight_file:
        (root / "unet" / weight_file).write_bytes(b"stub")
    return root


@pytest.mark.parametrize("weight_file", ["diffusion_pytorch_model.bin", "model.ckpt", "w.pt", "w.pth"])
def test_pickle_only_component_needs_allow_pickle(tmp_path: Path, weight_file: str) -> None:
    root = str(fake_checkpoint(tmp_path, weight_file))
    with pytest.raises(ModelLoadError, match="--allow-pickle") as err:
        check_model_source(root)
    assert "unet" in str(err.value) and "pickle" in str(err.value)
    check_model_source(root, allow_pickle=True)


def test_safetensors_component_passes_and_missing_weights_fail(tmp_path: Path) -> None:
    safe = fake_checkpoint(tmp_path / "safe", "diffusion_pytorch_model.safetensors")
    (safe / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"stub")  # ignored next to safetensors
    check_model_source(str(safe))
    with pytest.raises(ModelLoadError, match="no weight files"):
        check_model_source(str(fake_checkpoint(tmp_path / "empty", None)), allow_pickle=True)
    (safe / "scheduler" / "scheduler_config.json").unlink()
    (safe / "scheduler").rmdir()
    with pytest.raises(ModelLoadError, match="'scheduler'.*no folder"):
        check_model_source(str(safe))


def test_local_checkpoint_loads_like_the_embedded_model(tmp_path: Path) -> None:
    embedded = load_pipeline("tiny-sd", seed=3)
    embedded.save_pretrained(tmp_path / "safe")
    assert not list((tmp_path / "safe").rglob("*.bin"))
    local = load_pipeline(str(tmp_path / "safe"))
    assert type(local) is type(embedded) and local.safety_checker is None
    assert all(not m.training for m in local.components.values() if isinstance(m, torch.nn.Module))
    assert torch.equal(generate(local), generate(embedded))

    embedded.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_pipeline(str(tmp_path / "pickle"))
    trusted = load_pipeline(str(tmp_path / "pickle"), allow_pickle=True)
    assert torch.equal(trusted.unet.conv_in.weight, embedded.unet.conv_in.weight)


def wan_video(pipe: DiffusionPipeline, prompt: str = "a red cube on a table") -> np.ndarray:
    """A 2-step 17-frame 64x64 video (CFG: two transformer calls per step), as [1, 17, 64, 64, 3] floats in [0, 1]."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_frames=17, height=64, width=64, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="np").frames


@pytest.fixture(scope="module")
def tiny_wan() -> DiffusionPipeline:
    return load_pipeline("tiny-wan", seed=0)


def test_tiny_wan_builds_offline_as_wan21(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("building tiny-wan tried to open a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    pipe = load_pipeline("tiny-wan", seed=0)
    assert check_model_source("tiny-wan") == type(pipe).__name__ == "WanPipeline"
    parts = {name: type(part).__name__ for name, part in pipe.components.items() if part is not None}
    assert parts.pop("tokenizer") in ("T5Tokenizer", "T5TokenizerFast")  # one class in transformers 5
    assert parts == {"transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan", "text_encoder": "UMT5EncoderModel",
                     "scheduler": "UniPCMultistepScheduler"}
    sched = pipe.scheduler.config  # Wan2.1-T2V-1.3B-Diffusers' scheduler_config.json
    assert (sched.prediction_type, sched.use_flow_sigmas, sched.flow_shift, sched.solver_order) == \
        ("flow_prediction", True, 3.0, 2)
    tr, vae, enc = pipe.transformer.config, pipe.vae.config, pipe.text_encoder.config
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 8)
    assert vae.temperal_downsample == [False, True, True] and len(vae.dim_mult) == 4  # x4 in time, x8 in space
    assert tr.in_channels == tr.out_channels == vae.z_dim == len(vae.latents_mean) == len(vae.latents_std)
    assert tuple(tr.patch_size) == (1, 2, 2) and tr.text_dim == enc.d_model
    rope = pipe.transformer.rope
    assert rope.t_dim + rope.h_dim + rope.w_dim == tr.attention_head_dim and min(rope.t_dim, rope.h_dim) > 0
    assert len(pipe.tokenizer) <= enc.vocab_size == 640
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            assert not module.training and module.device.type == "cpu"


def test_tiny_wan_same_seed_same_weights(tiny_wan) -> None:
    again, other = load_pipeline("tiny-wan", seed=0), load_pipeline("tiny-wan", seed=1)
    for name in ("transformer", "vae", "text_encoder"):
        first, second = getattr(tiny_wan, name).state_dict(), getattr(again, name).state_dict()
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), name
    for a, b in zip(tiny_wan.transformer.parameters(), other.transformer.parameters()):
        if a.dim() > 1:
            assert not torch.equal(a, b)


def test_tiny_wan_transformer_output_varies(tiny_wan) -> None:
    cfg = tiny_wan.transformer.config
    latents = torch.randn(2, cfg.in_channels, 5, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 32, cfg.text_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        noise = tiny_wan.transformer(latents, torch.tensor([500, 500]), text, return_dict=False)[0]
        other_text = tiny_wan.transformer(latents, torch.tensor([500, 500]), text.flip(1).neg(), return_dict=False)[0]
    assert noise.shape == latents.shape and torch.isfinite(noise).all()
    assert noise.std(dim=(3, 4)).min() > 0.05, "flat in space"
    assert noise.std(dim=2).mean() > 0.05, "flat in time"
    assert not torch.allclose(noise, other_text), "the text does not reach the output"


def test_tiny_wan_generates_a_non_constant_video(tiny_wan) -> None:
    frames = wan_video(tiny_wan)
    assert frames.shape == (1, 17, 64, 64, 3)  # 4k + 1 frames: 5 latent frames, 8x8 latents
    assert np.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1
    assert frames.std(axis=(2, 3)).min() > 0.02, "a frame is flat"
    assert np.abs(np.diff(frames, axis=1)).mean() > 0.02, "the frames do not change"
    assert ((frames > 0.01) & (frames < 0.99)).mean() > 0.5, "video is saturated"


# The further DiT families (their outputs at ranks against one process: tests/test_dit_families.py) and tiny-wan22
# (Wan's workload, two transformers).
FAMILY_CLASSES = {"tiny-flux2": "Flux2KleinPipeline", "tiny-qwenimage": "QwenImagePipeline",
                  "tiny-zimage": "ZImagePipeline", "tiny-hunyuandit": "HunyuanDiTPipeline",
                  "tiny-auraflow": "AuraFlowPipeline", "tiny-lumina2": "Lumina2Pipeline", "tiny-sana": "SanaPipeline",
                  "tiny-ltx": "LTXPipeline",
                  "tiny-cogvideox": "CogVideoXPipeline", "tiny-hunyuanvideo": "HunyuanVideoPipeline",
                  "tiny-mochi": "MochiPipeline", "tiny-allegro": "AllegroPipeline", "tiny-wan22": "WanPipeline",
                  "tiny-helios": "HeliosPipeline", "tiny-ltx2": "LTX2Pipeline"}


@pytest.mark.parametrize("name", list(FAMILY_CLASSES))
def test_family_models_draw_the_same_weights_for_a_seed_and_leave_no_table_zero(name) -> None:
    """Same seed, same transformer; another seed, another; no weight or bare table (Mochi's rotary frequencies)
    left at zero, which would make a layer an identity and an equality test empty."""
    first, again, other = (load_pipeline(name, seed=seed) for seed in (0, 0, 1))
    assert type(first).__name__ == FAMILY_CLASSES[name]
    weights = [p.transformer.state_dict() for p in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    zero = [k for k, v in weights[0].items() if v.dim() > 1 and not v.any()]
    assert not zero, f"{name}: tables left at zero: {zero}"


def test_tiny_wan22_runs_its_two_experts_by_the_boundary() -> None:
    """Wan2.2-T2V-A14B's layout: `transformer` for the steps above the boundary timestep, `transformer_2` (other
    weights, same shape) below it; a 2-step call reaches both."""
    pipe = load_pipeline("tiny-wan22", seed=0)
    assert pipe.config.boundary_ratio == 0.875
    assert pipe.transformer.config == pipe.transformer_2.config
    first, second = pipe.transformer.state_dict(), pipe.transformer_2.state_dict()
    assert first.keys() == second.keys() and not all(torch.equal(first[k], second[k]) for k in first)
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(pipe, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a red cube on a table", num_frames=5, height=32, width=32, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert calls == {"transformer": 2, "transformer_2": 2}  # one step each, two guidance calls per step
    assert np.isfinite(frames).all() and frames.std() > 0.02


def test_bert_and_gemma_tokenizers_round_trip_and_pad() -> None:
    """tiny-hunyuandit's BERT (tools/make_bert_tokenizer.py: [CLS] … [SEP], lower case, CJK split, [UNK] outside the
    vocabulary) and tiny-lumina2's Gemma (tools/make_gemma_tokenizer.py: <bos> first, byte fallback, Lumina 2's
    system prompt in whole words)."""
    bert = load_pipeline("tiny-hunyuandit")
    tokenizer, encoder = bert.tokenizer, bert.text_encoder
    assert len(tokenizer) == encoder.config.vocab_size
    ids = tokenizer("A photo of an astronaut riding a horse, 日本 café", padding="max_length", max_length=40).input_ids
    assert ids[0] == tokenizer.cls_token_id and len(ids) == 40 and max(ids) < encoder.config.vocab_size
    n = ids.index(tokenizer.sep_token_id)
    assert set(ids[n + 1:]) == {tokenizer.pad_token_id} and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of an astronaut riding a horse, 日 本 café"
    gemma = load_pipeline("tiny-lumina2")
    tokenizer, encoder = gemma.tokenizer, gemma.text_encoder
    assert len(tokenizer) <= encoder.config.vocab_size
    prompt = f"{gemma.system_prompt} <Prompt Start> a red fox in the snow, 日本語 🐱"
    ids = tokenizer(prompt).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    assert len(tokenizer(f"{gemma.system_prompt} <Prompt Start> a red fox").input_ids) < 40


# Where a pipeline keeps its VAE's factors (diffusers names them differently per family).
SPATIAL = ("vae_scale_factor", "vae_scale_factor_spatial", "vae_spatial_compression_ratio", "vae_spatial_scale_factor")
TEMPORAL = ("vae_scale_factor_temporal", "vae_temporal_compression_ratio", "vae_temporal_scale_factor")


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_the_vae_factors_read_from_the_configs_are_the_pipelines_own(name: str) -> None:
    """`model_facts` reads them from the JSON configs before loading (memory estimate, default sizes); the loaded
    pipeline computes them itself."""
    facts, pipe = model_facts(name), load_pipeline(name)
    spatial = [getattr(pipe, attribute) for attribute in SPATIAL if hasattr(pipe, attribute)]
    temporal = [getattr(pipe, attribute) for attribute in TEMPORAL if hasattr(pipe, attribute)]
    assert facts is not None and spatial, f"{name}: no VAE facts, or no factor on the pipeline"
    assert (facts.vae.factor, facts.vae.temporal) == (spatial[0], temporal[0] if temporal else 1)


def test_every_embedded_model_is_tested_somewhere() -> None:
    """Image models and tiny-wan here; the other video models in tests/test_video_parts.py; the trained
    tiny-shapes and tiny-shapes-dit in tests/test_shapes_model.py."""
    assert set(EMBEDDED_MODELS) == set(CLASSES) | set(FAMILY_CLASSES) | {
        "tiny-t2v", "tiny-animatediff", "tiny-wan", "tiny-shapes", "tiny-shapes-dit"}

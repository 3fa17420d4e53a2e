"""Load a diffusers pipeline: an embedded tiny model or a local diffusers checkpoint directory.

Real models cannot be downloaded here, so embedded tiny models stand in for them: `tiny-sd`,
`tiny-sdxl` (UNets), `tiny-pixart` (PixArt-Sigma), `tiny-sd3` (SD3), `tiny-flux` (FLUX.1-dev), `tiny-flux2`
(FLUX.2 klein, Qwen3 text encoder), `tiny-qwenimage` (Qwen-Image, Qwen2.5-VL text encoder), `tiny-zimage`
(Z-Image), `tiny-hunyuandit` (HunyuanDiT, BERT + T5 text encoders), `tiny-auraflow` (AuraFlow, UMT5 text encoder),
`tiny-lumina2` (Lumina-Image 2.0, Gemma 2 text encoder), `tiny-t2v` (ModelScope text-to-video, UNet3D),
`tiny-animatediff` (AnimateDiff, UNetMotionModel), `tiny-wan` (Wan2.1 text-to-video, WanTransformer3DModel with a
causal 3D VAE and a UMT5 text encoder), `tiny-wan22` (Wan2.2 text-to-video with two experts, as Wan2.2-T2V-A14B:
`transformer` for the high-noise steps, `transformer_2` for the low-noise ones), `tiny-ltx` (LTX-Video),
`tiny-cogvideox` (CogVideoX), `tiny-hunyuanvideo` (HunyuanVideo, Llama + CLIP text encoders), `tiny-mochi`
(Mochi 1) and `tiny-allegro` (Allegro, T5 text encoder): the real diffusers architectures, built from the configs
shipped in `configs/<name>/` with random weights drawn from a fixed seed, and offline tokenizers written by
`tools/make_t5_tokenizer.py` (T5), `tools/make_bpe_tokenizer.py` (Qwen), `tools/make_llama_tokenizer.py`
(Llama), `tools/make_bert_tokenizer.py` (BERT) and `tools/make_gemma_tokenizer.py` (Gemma), beside a byte-level
CLIP tokenizer. `tiny-shapes` and `tiny-shapes-dit` are different: a Stable Diffusion and a PixArt-Σ pipeline
trained by `tools/train_shapes.py` on a procedural world of coloured shapes, whose weights ship
in `configs/<name>/` and load exactly as a local checkpoint does. A local checkpoint goes through `DiffusionPipeline.from_pretrained`
with hub access off. A hub id (`org/name[@revision]`) is fetched into the local hub cache once, by the job's checks
(`sources.fetch`), and then loads as a local checkpoint does; nothing else here touches the network.
diffusers and transformers (seconds to import) are imported only when a pipeline is built, so
`check_model_source` rejects a bad argument at once.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from paragen.comms import world_size
from paragen.pipelines import sources
from paragen.pipelines.sources import PICKLE_WEIGHTS, SAFE_WEIGHTS, ModelLoadError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

TRAINED_MODELS: tuple[str, ...] = ("tiny-shapes", "tiny-shapes-dit")  # trained by a repo script, weights shipped in configs/<name>/
EMBEDDED_MODELS: tuple[str, ...] = (
    "tiny-sd", "tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-flux2", "tiny-qwenimage", "tiny-zimage",
    "tiny-hunyuandit", "tiny-auraflow", "tiny-lumina2", "tiny-sana", "tiny-t2v", "tiny-animatediff", "tiny-wan",
    "tiny-wan22", "tiny-ltx", "tiny-cogvideox", "tiny-hunyuanvideo", "tiny-mochi", "tiny-allegro", "tiny-helios",
    "tiny-ltx2", *TRAINED_MODELS)

CONFIG_DIR = Path(__file__).parent / "configs"
LOADED = "paragen_loaded"  # a component's attribute: how this rank got its weights, where not read whole (the report)


def model_folder(model: str) -> Path:
    """The folder of a model's configs (and weights, for a trained embedded model, a local checkpoint or a fetched hub
    id)."""
    return CONFIG_DIR / model if model in EMBEDDED_MODELS else sources.folder(model)


def _random_weights(model: str) -> bool:
    """Whether `model` is an embedded model built from its configs with seeded random weights."""
    return model in EMBEDDED_MODELS and model not in TRAINED_MODELS


def _components(index: dict[str, Any]) -> dict[str, tuple[str, str] | None]:
    """Component name -> (library, class name), or None for a component left out ([null, null])."""
    parts: dict[str, tuple[str, str] | None] = {}
    for name, value in index.items():
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2:
            parts[name] = (value[0], value[1]) if value[0] and value[1] else None
    return parts


def read_index(root: Path) -> dict[str, Any]:
    """The `model_index.json` of the pipeline folder `root`; ModelLoadError, naming the file, if it is not a JSON
    object naming its pipeline class (`_class_name`)."""
    path = root / "model_index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error}); a diffusers pipeline folder has a model_index.json "
                             "as written by save_pretrained") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ModelLoadError(f'{path} does not name its pipeline class: it needs a "_class_name" entry such as '
                             '"StableDiffusionPipeline" (as written by save_pretrained)')
    return index


def check_model_source(model: str, *, allow_pickle: bool = False) -> str:
    """Fail fast, before any heavy work, if `model` is neither an embedded name nor a loadable directory (a hub id is
    fetched into the hub cache first, `sources.fetch`); return its pipeline class name.

    A local checkpoint must be a diffusers layout (`model_index.json`) whose every weighted component
    (a sub-folder with a `config.json`) holds safetensors weights; pickle weights run arbitrary code
    when loaded, so they are refused unless `allow_pickle` is set.
    """
    if _random_weights(model):
        return read_index(CONFIG_DIR / model)["_class_name"]
    if sources.hub_id(model) is not None:
        sources.fetch(model, allow_pickle=allow_pickle)
    root = model_folder(model)
    if not root.exists():
        raise ModelLoadError(
            f"unknown model {model!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), no such local path, "
            "and not a hub id (org/name or org/name@revision)"
        )
    if not root.is_dir():
        raise ModelLoadError(f"model path {model!r} is not a directory (a diffusers checkpoint is one)")
    if not (root / "model_index.json").is_file():
        raise ModelLoadError(f"model directory {model!r} has no model_index.json (not a diffusers pipeline)")
    index = read_index(root)
    for name, spec in _components(index).items():
        folder = root / name
        if spec is None:
            continue  # left out, e.g. the safety checker
        if not folder.is_dir():
            raise ModelLoadError(f"component {name!r} of {model!r} is in model_index.json but has no folder")
        if not (folder / "config.json").is_file():
            continue  # carries no weights: scheduler, tokenizer, feature extractor
        has_safe = any(folder.glob(SAFE_WEIGHTS))
        pickles = [f.name for p in PICKLE_WEIGHTS for f in folder.glob(p)]
        if not has_safe and pickles and not allow_pickle:
            raise ModelLoadError(
                f"component {name!r} of {model!r} has only pickle weights ({', '.join(sorted(pickles))}); "
                "pickle checkpoints are refused because loading them can run arbitrary code. "
                "Convert them to safetensors, or pass --allow-pickle if you trust the source."
            )
        if not has_safe and not pickles:
            raise ModelLoadError(f"component {name!r} of {model!r} has no weight files in {folder}")
    return index["_class_name"]


def component_class(library: str, class_name: str) -> type:
    """The class of a pipeline component as `model_index.json` names it. `library`: "diffusers", "transformers", or
    a diffusers pipeline module whose own class it is (LTX-2's "ltx2" connectors and vocoder)."""
    module = library if library in ("diffusers", "transformers") else f"diffusers.pipelines.{library}"
    return getattr(importlib.import_module(module), class_name)


def build_component(library: str, class_name: str, folder: Path) -> Any:
    """One component from its config in `folder`: random weights for models (`build_empty`: none), files for the
    tokenizer."""
    import transformers

    cls = component_class(library, class_name)
    if library != "transformers":
        return cls.from_config(cls.load_config(folder))
    if issubclass(cls, transformers.PreTrainedTokenizerBase):
        return cls.from_pretrained(folder, local_files_only=True)
    return cls(cls.config_class.from_pretrained(folder, local_files_only=True))


def build_empty(library: str, class_name: str, folder: Path, *, buffers: bool) -> torch.nn.Module:
    """A model component built from its config with its parameters on torch's `meta` device (no memory; its buffers
    too with `buffers`, else built for real), tied as loading ties it (`tie_weights`)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=buffers):
        module = build_component(library, class_name, folder)
    return tie_weights(module)


def tie_weights(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with the weights its model ties (T5's shared embeddings) tied again: transformers ties them when it
    loads, and an empty build or `to_empty` leaves them apart."""
    if callable(getattr(module, "tie_weights", None)):
        module.tie_weights()
    return module


def model_components(model: str) -> dict[str, tuple[str, str] | None]:
    """Component name -> (library, class name) of an embedded or local diffusers model (None: left out)."""
    return _components(read_index(model_folder(model)))


def _redraw_zero_layers(model: torch.nn.Module) -> None:
    """Give layers that a class initialises to zero (UNet3D's last temporal conv, which makes the block an
    identity until trained) their default random initialisation, and zero tables held as bare parameters (Mochi's
    rotary frequencies, which make its RoPE the identity) unit normal values, so that an embedded model exercises
    them."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and weight.dim() > 1 and not weight.any():
            module.reset_parameters()
        for name, parameter in module.named_parameters(recurse=False):
            if name not in ("weight", "bias") and parameter.dim() > 1 and not parameter.any():
                with torch.no_grad():
                    parameter.normal_()


def _build_embedded(name: str, seed: int, dtype: torch.dtype) -> DiffusionPipeline:
    """Build an embedded pipeline; the same seed gives the same weights in every process."""
    import diffusers

    root = CONFIG_DIR / name
    index = read_index(root)
    components = _components(index)
    parts: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        for comp, spec in components.items():
            parts[comp] = None if spec is None else build_component(spec[0], spec[1], root / comp)
        for part in parts.values():
            if isinstance(part, torch.nn.Module):
                _redraw_zero_layers(part)
    # Random weights now give non-constant outputs through every layer
    # (tests/test_loading.py checks the UNet output and the decoded image).
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            # nn.Module.to, not ModelMixin.to: the latter warns on every dtype cast, even a harmless one.
            torch.nn.Module.to(part, dtype=dtype).eval()
    settings = {k: v for k, v in index.items() if not k.startswith("_") and k not in components}
    return getattr(diffusers, index["_class_name"])(**parts, **settings)


def load_pipeline(
    model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", allow_pickle: bool = False,
    seed: int = 0,
) -> DiffusionPipeline:
    """The pipeline for an embedded name or a local checkpoint directory, in eval mode on `device` in `dtype`,
    after `check_model_source`.

    `seed` only matters for embedded models with random weights (it draws them, on the CPU, so every device gets the
    same weights).
    """
    check_model_source(model, allow_pickle=allow_pickle)
    return build_pipeline(model, dtype=dtype, device=device, allow_pickle=allow_pickle, seed=seed)


def build_pipeline(
    model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", allow_pickle: bool = False,
    seed: int = 0, shard_weights: bool = False, offload_layers: bool = False, read_once: bool | None = None,
) -> DiffusionPipeline:
    """`load_pipeline` for a `model` that passed `check_model_source` already. `shard_weights`: the denoisers' and
    text encoders' weights sharded over the ranks (`paragen.parallel.weights`; a local checkpoint's read by slices,
    `sharded_load`), only the shards ever on the device. `read_once`: whole weights on several ranks are read by the
    output rank and sent to the others (`broadcast_load`); default: on CUDA devices, where the broadcast runs at the
    interconnect's speed, while on the CPU each rank maps the files, which the page cache shares (a 4.5 GB checkpoint
    at 2 ranks: 3.6–9.9 s to send over gloo, 0.1–2.9 s to map). `offload_layers`: their blocks (with `shard_weights`, their
    shards) kept in host memory and brought onto the device as they run (`paragen.parallel.offload`)."""
    device = torch.device(device)
    if _random_weights(model):
        pipe = _build_embedded(model, seed, dtype)
    else:
        import diffusers

        root = model_folder(model)
        index = read_index(root)
        no_checker = {"safety_checker": None, "requires_safety_checker": False}
        # the pipeline's own class: only it knows which components are optional, and DiffusionPipeline.from_pretrained
        # loads an optional component from the folder even when one is passed in (Wan's transformer)
        pipeline = getattr(diffusers, index["_class_name"], diffusers.DiffusionPipeline)
        read = functools.partial(
            pipeline.from_pretrained,  # loads on CPU, in eval mode
            root,
            dtype=dtype,
            use_safetensors=None if allow_pickle else True,  # None: safetensors first, else pickle
            local_files_only=True,
            **(no_checker if "safety_checker" in index else {}),
        )
        if shard_weights:
            from paragen.pipelines.sharded_load import load_sharded_components

            pipe = read(**load_sharded_components(root, _components(index), dtype, device, offload_layers))
        elif world_size() > 1 and (device.type == "cuda" if read_once is None else read_once):
            from paragen.pipelines.broadcast_load import load_once

            pipe = load_once(root, _components(index), torch.device("cpu") if offload_layers else device, read)
        else:
            pipe = read()
    if shard_weights or offload_layers:
        from paragen.parallel.placement import place_pipeline_weights

        place_pipeline_weights(pipe, device, shard_weights, offload_layers)  # places the shards itself
    from paragen.comms.weight_shards import is_sharded  # FSDP: 0.8 s to import, not for check_model_source

    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module) and not is_sharded(part):
            torch.nn.Module.to(part, device)  # nn.Module.to: ModelMixin.to warns on every cast, even a harmless one
    return _decodable(pipe)


TILED_ONLY_VAES = ("AutoencoderKLAllegro",)  # VAE classes whose untiled decode raises NotImplementedError


def _decodable(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """`pipe`, with the tiles of a VAE that decodes only in tiles (`TILED_ONLY_VAES`) turned on."""
    vae = getattr(pipe, "vae", None)
    if type(vae).__name__ in TILED_ONLY_VAES and not vae.use_tiling:
        vae.enable_tiling()
    return pipe

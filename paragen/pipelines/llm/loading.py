"""Load a causal LM: an embedded tiny model or a local transformers checkpoint directory.

Embedded: `tiny-llama` (Llama architecture with grouped-query attention, random weights from a fixed
seed) and `tiny-passkey` (a 2-layer Llama trained by `tools/train_passkey.py` to retrieve a passkey
from long contexts; its safetensors weights ship in `configs/tiny-passkey/`), `tiny-passkey-lm` (the same shape
trained also to go on with the text after the answer, as a language model does: the target that speculative
decoding's acceptance means something on) and `tiny-passkey-draft` (a 1-layer draft for speculative decoding on
the same vocabulary); all three trained by `tools/train_passkey.py --model NAME`. A local checkpoint is a
`from_pretrained` directory with a `config.json` and safetensors weights; pickle weights (`*.bin`,
`*.pt`) are refused unless allowed, and so is a config that names remote code (`auto_map`). A hub id is fetched
into the hub cache by the checks (`sources.fetch`) and loads as a local checkpoint; nothing else touches the network. transformers is imported only when a model is built, so
`check_llm_source` rejects a bad argument at once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from paragen.pipelines import sources
from paragen.pipelines.loading import CONFIG_DIR, PICKLE_WEIGHTS, SAFE_WEIGHTS, ModelLoadError
from paragen.pipelines.registry import CAUSAL_LMS

EMBEDDED_LLMS: tuple[str, ...] = ("tiny-llama", "tiny-passkey", "tiny-passkey-lm", "tiny-passkey-draft")


def model_root(model: str) -> Path:
    """The folder of an embedded model's shipped files, the local checkpoint directory `model`, or a fetched hub id's
    snapshot."""
    return CONFIG_DIR / model if model in EMBEDDED_LLMS else sources.folder(model)


def llm_config_dict(model: str) -> dict[str, Any]:
    """The `config.json` of an embedded name or a local directory (no transformers import)."""
    with open(model_root(model) / "config.json", encoding="utf-8") as f:
        return json.load(f)


def check_llm_source(model: str, *, allow_pickle: bool = False, allow_remote_code: bool = False) -> str:
    """Fail fast, before any heavy work, if `model` cannot be loaded; return its model class name."""
    if model not in EMBEDDED_LLMS:
        if sources.hub_id(model) is not None:
            sources.fetch(model, allow_pickle=allow_pickle)
        _check_local(model, allow_pickle, allow_remote_code)
    return llm_class(model)


def llm_class(model: str) -> str:
    """The model class its `config.json` names (the first paragen runs, else the first named)."""
    architectures = llm_config_dict(model).get("architectures") or ["unknown"]
    return next((name for name in architectures if name in CAUSAL_LMS), architectures[0])


def _check_local(model: str, allow_pickle: bool, allow_remote_code: bool) -> None:
    root = model_root(model)
    if not root.is_dir():
        raise ModelLoadError(
            f"unknown model {model!r}: not an embedded model ({', '.join(EMBEDDED_LLMS)}), no such local directory, "
            "and not a hub id (org/name or org/name@revision)"
        )
    if not (root / "config.json").is_file():
        raise ModelLoadError(f"model directory {model!r} has no config.json (not a transformers checkpoint)")
    config = llm_config_dict(model)
    if "auto_map" in config and not allow_remote_code:
        raise ModelLoadError(
            f"{model!r} needs remote code (its config.json has auto_map), which runs arbitrary Python; "
            "refused unless --allow-remote-code is given"
        )
    pickles = [f.name for pattern in PICKLE_WEIGHTS for f in root.glob(pattern)]
    if not any(root.glob(SAFE_WEIGHTS)):
        if not pickles:
            raise ModelLoadError(f"model directory {model!r} holds no weights (*.safetensors)")
        if not allow_pickle:
            raise ModelLoadError(
                f"{model!r} has only pickle weights ({', '.join(sorted(pickles))}), which run arbitrary code when "
                "loaded; convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
    architectures = config.get("architectures") or []
    if not allow_remote_code and not set(architectures) & set(CAUSAL_LMS):
        raise ModelLoadError(f"{model!r} is a {architectures or 'model of unknown architecture'}; paragen llm "
                             f"supports {', '.join(CAUSAL_LMS)}")


def load_llm(
    model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
    allow_pickle: bool = False, allow_remote_code: bool = False,
) -> torch.nn.Module:
    """Build the causal LM `model` (embedded name or local directory), in eval mode, on `device`, after
    `check_llm_source`."""
    check_llm_source(model, allow_pickle=allow_pickle, allow_remote_code=allow_remote_code)
    return build_llm(model, dtype=dtype, device=device, seed=seed, allow_pickle=allow_pickle,
                     allow_remote_code=allow_remote_code)


def build_llm(
    model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
    allow_pickle: bool = False, allow_remote_code: bool = False,
) -> torch.nn.Module:
    """`load_llm` for a `model` that passed `check_llm_source` already."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model in EMBEDDED_LLMS:
        root = model_root(model)
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        weights = root / "model.safetensors"
        if weights.is_file():
            built = AutoModelForCausalLM.from_pretrained(root, local_files_only=True, dtype=dtype)
        else:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                built = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        built = AutoModelForCausalLM.from_pretrained(
            model_root(model), local_files_only=True, dtype=dtype, trust_remote_code=allow_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
    return built.to(device).eval()

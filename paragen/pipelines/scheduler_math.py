"""What the structure seeding needs from a diffusers scheduler: the clean latent a prediction implies."""
from __future__ import annotations

import torch


def predicted_original(scheduler, sample: torch.Tensor, model_output: torch.Tensor, timestep) -> torch.Tensor:
    """x̂0 implied by `model_output` at `timestep` for the (unscaled) latent `sample`.

    Two latent conventions exist among diffusers' schedulers: variance-preserving ones (DDIM, DDPM,
    PNDM, DPM-Solver, UniPC; `init_noise_sigma == 1`), where x_t = √ᾱ·x0 + √(1-ᾱ)·ε, and the
    sigma-scaled ones (Euler, LMS, Heun; `init_noise_sigma > 1`), where x_t = x0 + σ·ε. The sigma-scaled
    ones must already have been given this step's `scale_model_input` (that sets their step index).
    """
    x0 = _from_prediction(scheduler, sample, model_output, timestep)
    if getattr(scheduler.config, "clip_sample", False):  # as the scheduler's own step does
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    return x0


def _from_prediction(scheduler, sample: torch.Tensor, model_output: torch.Tensor, timestep) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return model_output
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"structure seeding does not know prediction_type {kind!r}")
    if float(scheduler.init_noise_sigma) > 1.0 and hasattr(scheduler, "sigmas"):
        sigma = scheduler.sigmas[scheduler.step_index].to(sample.dtype)
        if kind == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    alpha = scheduler.alphas_cumprod[int(timestep)].to(sample.dtype)
    if kind == "epsilon":
        return (sample - (1 - alpha).sqrt() * model_output) / alpha.sqrt()
    return alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output

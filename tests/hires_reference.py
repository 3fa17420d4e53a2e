"""A single-process oracle of the hires algorithm, written separately from paragen's code (it imports
nothing from paragen) as plainly as possible: every step it runs the low-resolution (LR) branch, then
every window in order, and averages. The parallel runs must match it.

The algorithm (see paragen/pipelines/hires.py): windows of `window` latent pixels at evenly spread
offsets at most `stride` apart; an LR latent of the same aspect whose longer side is `window`, started
from the HR noise pooled to its size (times the pooling factor, to keep unit variance); the LR branch
has its own copy of the scheduler and runs every step with plain classifier-free guidance; its raw
noise prediction and the min-max-normalised mean cross-attention map of the chosen up-block layers
(conditional half, heads and prompt tokens averaged) are upsampled bilinearly and mixed into each
window's prediction with weight w0·((1+cos(π·s))/2)^decay; the first `fraction` of the steps run the LR
branch alone and the HR latent is then replaced by the LR's x̂0, upsampled and re-noised with the HR
noise to the next timestep. `lag=1` mixes in the LR output of the previous step (the async variant).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F


def _starts(length: int, window: int, stride: int) -> list[int]:
    n = math.ceil((length - window) / stride) + 1
    return [0] if n == 1 else [round(i * (length - window) / (n - 1)) for i in range(n)]


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class _MapProcessor:
    """Cross-attention written out (probabilities explicit); stores each layer's map when `on`."""

    def __init__(self, store: dict) -> None:
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        b, n, _ = q.shape
        h = attn.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        if self.store["on"]:
            probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
            out = probs @ v
            rows, cols = self.store["grid"]
            f = round(math.sqrt(rows * cols / n))
            words = probs[b // 2 :, :, :, self.store["tokens"]].mean(dim=(1, 3))
            self.store["maps"].append(_up(words.view(-1, 1, rows // f, cols // f), (rows, cols)))
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def reference_hires(pipe, *, prompt: str, height: int, width: int, steps: int, guidance_scale: float, seed: int,
                    window: int, stride: int, w0: float, decay: float, fraction: float, lag: int,
                    map_prefix: str = "up_blocks") -> torch.Tensor:
    """The image (`output_type="pt"`) of the hires algorithm on a plain diffusers SD/SDXL pipeline."""
    unet = pipe.unet
    store = {"on": False, "maps": [], "grid": None, "tokens": None}
    for name, module in unet.named_modules():
        if name.startswith(map_prefix) and name.endswith("attn2"):
            module.set_processor(_MapProcessor(store))
    forward = unet.forward
    n_tokens = len(pipe.tokenizer(prompt).input_ids)
    store["tokens"] = slice(1, n_tokens - 1)
    rows, cols = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    scale = window / max(rows, cols)
    lr_size = (round(rows * scale), round(cols * scale))
    factor = rows // lr_size[0]
    assert rows == factor * lr_size[0] and cols == factor * lr_size[1], "pick sizes that pool exactly"
    tops, lefts = _starts(rows, window, stride), _starts(cols, window, stride)
    st = {"step": -1, "history": []}

    def prepare(*args, **kwargs):
        latents = prepare_latents(*args, **kwargs)
        st["noise"] = latents / pipe.scheduler.init_noise_sigma
        return latents

    prepare_latents = pipe.prepare_latents
    pipe.prepare_latents = prepare

    def lr_pass(t, kwargs):
        sched, z = st["sched"], st["z"]
        store.update(on=w0 > 0, maps=[], grid=lr_size)
        eps = forward(sched.scale_model_input(torch.cat([z, z]), t), t, return_dict=False, **kwargs)[0]
        store["on"] = False
        if w0 > 0:
            m = torch.stack(store["maps"]).mean(0)
            lo = m.amin(dim=(1, 2, 3), keepdim=True)
            hi = m.amax(dim=(1, 2, 3), keepdim=True)
            m = (m - lo) / (hi - lo)
        else:
            m = torch.zeros(z.shape[0], 1, *lr_size)
        u, c = eps.chunk(2)
        out = sched.step(u + guidance_scale * (c - u), t, z)
        st["z"] = out.prev_sample
        st["x0"] = out.pred_original_sample
        st["history"].append((eps, m))

    def hires_forward(sample, t, *args, return_dict=True, **kwargs):
        st["step"] += 1
        s = st["step"]
        total = len(pipe.scheduler.timesteps)
        if s == 0:
            st["sched"] = copy.deepcopy(pipe.scheduler)
            st["z"] = F.avg_pool2d(st["noise"], factor) * factor * st["sched"].init_noise_sigma
            st["k"] = min(round(fraction * total), total - 1)
        lr_pass(t, kwargs)
        if s < st["k"]:
            return (_up(st["history"][-1][0], (rows, cols)),)
        eps_lr, m = st["history"][s - lag if s >= lag else s]
        eps_lr, m = _up(eps_lr, (rows, cols)), _up(m, (rows, cols)).repeat(2, 1, 1, 1)
        w = w0 if decay == 0 else w0 * ((1 + math.cos(math.pi * (s - st["k"]) / max(1, total - st["k"]))) / 2) ** decay
        acc, count = torch.zeros_like(sample), torch.zeros(rows, cols)
        for top in tops:
            for left in lefts:
                region = (..., slice(top, top + window), slice(left, left + window))
                e = forward(sample[region], t, *args, return_dict=False, **kwargs)[0]
                acc[region] += e + w * m[region] * (eps_lr[region] - e)
                count[region[1:]] += 1
        return (acc / count,)

    def on_step_end(p, i, t, kw):
        if i == st["k"] - 1:
            up = _up(st["x0"], (rows, cols))
            return {"latents": p.scheduler.add_noise(up, st["noise"], p.scheduler.timesteps[i + 1 : i + 2])}
        return {}

    unet.forward = hires_forward
    try:
        return pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=torch.Generator().manual_seed(seed), output_type="pt", callback_on_step_end=on_step_end).images
    finally:
        unet.forward = forward
        pipe.prepare_latents = prepare_latents

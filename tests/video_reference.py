"""A single-process reference of dual-scope temporal attention on the whole video, written apart from paragen.

`install_reference(pipe, ...)` puts `DualScopeReference` processors on the temporal self-attention modules of
a stock TextToVideoSD / AnimateDiff pipeline. For each query frame i the keys are, concatenated:
  - every frame j with |i - j| <= local, scored + the local bias;
  - the global frames (evenly spaced over the video, numpy's linspace rounded), scored + the global bias;
with (local bias, global bias) = (0, bias) while the timestep is >= switch, else (bias, 0).
For AnimateDiff beyond its 32 trained positions, frame g of F is embedded at g * 31 / (F - 1).
Nothing here imports paragen: this is what the partitioned implementation must equal.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def global_frames(frames: int, count: int) -> list[int]:
    if count >= frames:
        return list(range(frames))
    return [int(i) for i in np.unique(np.round(np.linspace(0, frames - 1, count)).astype(int))]


class DualScopeReference:
    def __init__(self, state: dict, local: int, count: int, bias: float, switch: float) -> None:
        self.state, self.local, self.count, self.bias, self.switch = state, local, count, bias, switch

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        n, frames, _ = hidden_states.shape
        heads = attn.heads

        def split(x):
            return x.view(n, frames, heads, -1).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        index = torch.arange(frames)
        far = (index[:, None] - index[None, :]).abs() > self.local
        g = global_frames(frames, self.count)
        local_bias, global_bias = (0.0, self.bias) if self.state["t"] >= self.switch else (self.bias, 0.0)
        scale = 1 / math.sqrt(q.shape[-1])
        s_local = (q @ k.transpose(-1, -2)) * scale + local_bias
        s_local = s_local.masked_fill(far, float("-inf"))
        s_global = (q @ k[:, :, g].transpose(-1, -2)) * scale + global_bias
        weights = torch.softmax(torch.cat([s_local, s_global], dim=-1), dim=-1)
        out = weights @ torch.cat([v, v[:, :, g]], dim=2)
        out = out.transpose(1, 2).reshape(n, frames, -1)
        return attn.to_out[1](attn.to_out[0](out))


def _stretched_positions(module, frames_state: dict):
    def forward(x):
        frames, dim = x.shape[1], module.pe.shape[2]
        trained = module.pe.shape[1]
        if frames <= trained:
            return x + module.pe[:, :frames]
        pos = torch.arange(frames, dtype=torch.float32) * (trained - 1) / (frames - 1)
        freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        table = torch.zeros(frames, dim)
        table[:, 0::2] = torch.sin(pos[:, None] * freq)
        table[:, 1::2] = torch.cos(pos[:, None] * freq)
        return x + table
    return forward


def install_reference(pipe, local: int, count: int, bias: float, switch: float) -> None:
    """Dual-scope reference processors (and stretched positions) on the pipeline's temporal modules."""
    state = {"t": 1000.0}
    pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: state.update(t=float(args[1] if len(args) > 1 else kwargs["timestep"])),
        with_kwargs=True)
    for module in pipe.unet.modules():
        if type(module).__name__ in ("TransformerTemporalModel", "AnimateDiffTransformer3D"):
            for block in module.transformer_blocks:
                for attn in (block.attn1, block.attn2):
                    attn.set_processor(DualScopeReference(state, local, count, bias, switch))
                if block.pos_embed is not None:
                    block.pos_embed.forward = _stretched_positions(block.pos_embed, state)

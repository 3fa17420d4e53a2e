"""Cross-attention maps of the low-resolution pass: where in the image the prompt's words land.

`MapRecorder` is shared by the processors of the chosen cross-attention layers. While it is recording,
each of them computes its attention probabilities explicitly and adds the mean over heads and prompt
tokens, resized to the low-resolution grid, to the recorder; otherwise it runs diffusers' SDPA path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from paragen.parallel.attention_contract import AttnProcessorContract, heads_first
from paragen.parallel.hires.guidance import normalise_map, resize

# Processors whose computation `MapAttnProcessor` repeats (others are refused by name).
REPLACEABLE = ("AttnProcessor2_0", "AttnProcessor")


class MapRecorder:
    """Accumulates the maps of one low-resolution UNet pass."""

    def __init__(self) -> None:
        self.recording = False
        self.grid: tuple[int, int] = (0, 0)
        self.tokens = slice(1, None)
        self.samples = slice(None)
        self._total: torch.Tensor | None = None
        self._layers = 0

    def start(self, grid: tuple[int, int], tokens: slice, samples: slice) -> None:
        """Record the next pass on a `grid` latent, averaging `tokens` of the batch entries `samples`."""
        self.recording, self.grid, self.tokens, self.samples = True, grid, tokens, samples
        self._total, self._layers = None, 0

    def stop(self) -> torch.Tensor:
        """End the pass; the layers' mean map normalised to [0, 1], `[B, 1, *grid]`."""
        self.recording = False
        if self._total is None:
            raise ValueError("no cross-attention layer recorded a map (do map_layers name cross-attention blocks?)")
        return normalise_map(self._total / self._layers).unsqueeze(1)

    def add(self, probs: torch.Tensor) -> None:
        """`probs` `[B, H, L, T]` of one layer whose L query tokens tile the grid at its resolution."""
        rows, cols = self.grid
        factor = round(math.sqrt(rows * cols / probs.shape[2]))
        shape = (math.ceil(rows / factor), math.ceil(cols / factor))
        if shape[0] * shape[1] != probs.shape[2]:
            raise ValueError(f"cannot place {probs.shape[2]} attention queries on a {rows}x{cols} grid")
        words = probs[self.samples, :, :, self.tokens].mean(dim=(1, 3))
        layer_map = resize(words.view(-1, 1, *shape), self.grid)[:, 0].float()
        self._total = layer_map if self._total is None else self._total + layer_map
        self._layers += 1


class MapAttnProcessor(AttnProcessorContract):
    """diffusers' cross-attention, with the probabilities handed to a `MapRecorder` while it records."""

    def __init__(self, recorder: MapRecorder) -> None:
        super().__init__(recorder)

    def attend(self, attn, hidden_states, encoder_hidden_states):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = heads_first(attn.to_q(hidden_states), attn.heads)
        key, value = heads_first(attn.to_k(context), attn.heads), heads_first(attn.to_v(context), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if not self.ctx.recording:
            return F.scaled_dot_product_attention(query, key, value)
        # SDPA's default scale, as diffusers' processor uses it
        probs = torch.softmax((query @ key.transpose(-1, -2)).float() * query.shape[-1] ** -0.5, dim=-1)
        self.ctx.add(probs)
        return probs.to(value.dtype) @ value


def install_map_processors(unet, prefixes: tuple[str, ...], recorder: MapRecorder) -> list[str]:
    """Give the cross-attention layers under `prefixes` a `MapAttnProcessor`; returns their names."""
    from diffusers.models.attention_processor import Attention

    chosen = [(name, m) for name, m in unet.named_modules()
              if isinstance(m, Attention) and m.is_cross_attention and name.startswith(prefixes)]
    if not chosen:
        raise ValueError(f"no cross-attention layer of the UNet is under {', '.join(prefixes)} (map_layers)")
    for name, attn in chosen:
        if type(attn.processor).__name__ not in REPLACEABLE:
            raise ValueError(f"{name} uses {type(attn.processor).__name__}; the guidance map needs one of "
                             f"{', '.join(REPLACEABLE)}")
    for _, attn in chosen:
        attn.set_processor(MapAttnProcessor(recorder))
    return [name for name, _ in chosen]

"""The Wan VAE's decode over the ranks by time chunks, exact.

The Wan decoder turns the latent video into frames one latent frame at a time (1 frame from the first, the
temporal factor from each later one); its causal 3D convolutions keep the last input frames of every layer in
a cache that the next latent frame reads. Here rank r decodes a contiguous chunk of latent frames: it takes
the cache left by the chunk before it from rank r-1, decodes its frames, and hands its cache on to rank r+1 —
the state at the boundary travels, nothing is recomputed, and the frames equal the one-device decode. Each rank
holds the decoder activations and output frames of its own chunk only (the memory wall of decoding a long
video on one device). Each rank sends its frames to the output rank as soon as they are decoded; the output rank
hands each chunk on as a clip (`on_clip`: a server streams it) as it arrives, and returns the whole video; the other
ranks return a video of no frames (as the UNet video runtime's do). The hand-over makes the chunks run one after
another: this divides memory, not time. Where the latent frames do not split evenly, the later chunks take the extra
frames, so the first clip, which streams first, is never the longest.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from paragen.comms import GroupComm
from paragen.parallel.partition import split_sizes


def output_frames(latent_frames: int, first: int, temporal: int) -> int:
    """Video frames decoded from latent frames `[first, first + latent_frames)`: 1 from latent frame 0, `temporal`
    from each later one."""
    return sum(1 if index == 0 else temporal for index in range(first, first + latent_frames))


class ChunkedWanDecode:
    """`vae.decode` of an `AutoencoderKLWan`, its latent frames cut into one chunk per rank of `comm`; the output rank
    (rank 0 of `comm`) calls `on_clip(index, clips, frames)` with each chunk's frames as they arrive."""

    def __init__(self, vae: Any, comm: GroupComm, on_clip: Callable[[int, int, torch.Tensor], None]) -> None:
        self.vae = vae
        self.comm = comm
        self.on_clip = on_clip

    @torch.no_grad()  # inference: the frames cross ranks, no gradient follows them
    def __call__(self, original, z: torch.Tensor, return_dict: bool = True) -> Any:
        vae, comm = self.vae, self.comm
        if comm.size == 1 or vae.use_tiling or vae.use_slicing:  # the library's own tiled or sliced decode
            return original(z, return_dict=return_dict)
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify
        from diffusers.models.autoencoders.vae import DecoderOutput

        sizes = split_sizes(z.shape[2], comm.size)[::-1]  # the longest last: the first clip comes soonest
        first = sum(sizes[:comm.rank])
        cache = comm.recv_from_prev(z.device, "wan.vae_cache")
        if cache is None:
            cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())  # one per conv
        frames = []
        if sizes[comm.rank]:
            latents = vae.post_quant_conv(z[:, :, first:first + sizes[comm.rank]])
            for offset in range(sizes[comm.rank]):
                frames.append(vae.decoder(latents[:, :, offset:offset + 1], feat_cache=cache, feat_idx=[0],
                                          first_chunk=first + offset == 0))
        comm.send_to_next(cache, "wan.vae_cache")
        temporal = vae.config.scale_factor_temporal
        counts = [output_frames(n, sum(sizes[:r]), temporal) for r, n in enumerate(sizes)]
        mine = torch.cat(frames, dim=2) if frames else self._no_frames(z)

        def finish(part: torch.Tensor) -> torch.Tensor:
            if vae.config.patch_size is not None:
                part = unpatchify(part, patch_size=vae.config.patch_size)
            return part.clamp(-1.0, 1.0)

        clips = [rank for rank, n in enumerate(counts) if n]  # the ranks with frames, in order: one clip each

        def arrived(rank: int, part: torch.Tensor) -> None:
            if counts[rank]:
                self.on_clip(clips.index(rank), len(clips), finish(part))

        video = comm.gather_varlen(mine, 2, counts, 0, "wan.vae_frames", arrived)
        video = finish(mine[:, :, :0] if video is None else video)
        return DecoderOutput(sample=video) if return_dict else (video,)

    def _no_frames(self, z: torch.Tensor) -> torch.Tensor:
        """An empty chunk of output frames (a rank with no latent frame), shaped like the others'."""
        vae = self.vae
        scale = vae.config.scale_factor_spatial // (vae.config.patch_size or 1)
        channels = vae.config.out_channels * (vae.config.patch_size or 1) ** 2
        return z.new_empty(z.shape[0], channels, 0, z.shape[3] * scale, z.shape[4] * scale)

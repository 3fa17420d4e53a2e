"""Partition maths: contiguous splits, row bands, conv halo widths, partial-attention rows, and the size checks.

`split_sizes` is the one place a length is cut into contiguous pieces (token shards, LLM prompt shards,
video clips and segments, row bands): sizes differ by at most one, the earlier pieces taking the extra.
Row bands are the equal case: band i of `rows` split into `parts` is `[i·rows/parts, (i+1)·rows/parts)`.
Equal bands keep every all-gather a single flat buffer and every layer's shapes identical on all ranks.
"""
from __future__ import annotations

import math


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous pieces of `total`: they differ by at most one, the first `total % parts`
    pieces taking one more."""
    if parts < 1:
        raise ValueError(f"cannot split {total} into {parts} parts")
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def split_bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    """`[start, stop)` of piece `index` of `split_sizes(total, parts)`."""
    sizes = split_sizes(total, parts)
    if not 0 <= index < parts:
        raise IndexError(f"piece {index} of {parts}")
    start = sum(sizes[:index])
    return start, start + sizes[index]


def band_bounds(rows: int, parts: int, index: int) -> tuple[int, int]:
    """Rows `[start, stop)` of band `index` when `rows` split evenly into `parts`."""
    if rows % parts:
        raise ValueError(f"{rows} rows do not split into {parts} equal bands")
    return split_bounds(rows, parts, index)


def conv_span(kernel: int, dilation: int = 1) -> int:
    """Input rows one output row of a conv reads: `dilation·(kernel-1)+1`."""
    return dilation * (kernel - 1) + 1


def conv_halo(kernel: int, stride: int, padding: int, dilation: int = 1) -> tuple[int, int]:
    """Rows a band needs from above and below for a conv along that axis: `(top, bottom)`.

    For a band whose first row is a multiple of `stride`, the output rows of the band need input rows
    `[start - padding, stop - stride - padding + span)` with `span = dilation·(kernel-1)+1`.
    At the image's edges these rows are the conv's zero padding.
    """
    span = conv_span(kernel, dilation)
    top, bottom = padding, span - padding - stride
    if bottom < 0:
        raise ValueError(f"conv kernel {kernel}, stride {stride}, padding {padding}: band would drop rows")
    return top, bottom


def partial_rows(band_rows: int, fraction: float) -> int:
    """Rows of each neighbouring band that partial (PCPP) attention sees: at least one."""
    return max(1, min(band_rows, math.ceil(fraction * band_rows)))


def check_image_size(
    height: int, width: int, *, vae_factor: int, unet_factor: int, patch: int, decode_parts: int
) -> None:
    """Raise ValueError, with the sizes that would work, if the request cannot be split.

    The latent (`height/vae_factor` rows) is cut into `patch` bands whose height is a multiple of the
    UNet's own down-sampling factor, and into `decode_parts` bands for the parallel VAE decode.
    """
    for name, value in (("height", height), ("width", width)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        if value % vae_factor:
            raise ValueError(f"{name} {value} is not a multiple of the VAE factor {vae_factor}")
    latent_rows = height // vae_factor
    if patch > latent_rows:
        raise ValueError(f"more ranks than latent rows: patch={patch} bands for {latent_rows} latent rows (height {height})")
    row_multiple = math.lcm(patch * unet_factor, decode_parts)
    if latent_rows % row_multiple:
        good = vae_factor * row_multiple
        raise ValueError(
            f"height {height} gives {latent_rows} latent rows, which do not split into {patch} bands of a "
            f"multiple of {unet_factor} rows (the UNet's down-sampling) and {decode_parts} decode bands; "
            f"use a height that is a multiple of {good}"
        )
    if (width // vae_factor) % unet_factor:
        raise ValueError(f"width {width}: the latent width must be a multiple of {unet_factor}; use a multiple of {vae_factor * unet_factor}")

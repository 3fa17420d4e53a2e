"""Does a trained shapes model use the cell words where the layout is decided? (issue 18)

For "a large red square at the {cell}" and each of the 9 cells, the clean latent the denoiser predicts at the
noisiest step of a 20-step DDIM run (t = 951, almost pure noise), averaged over `--noises` noises, is decoded; the
picture's redness (red minus the mean of green and blue) is averaged over each cell of the 3 × 3 grid. A model that
ties the cell words to places makes the named cell the reddest; one that does not puts its red in the same cell
whatever the caption says. A weaker tie can hide under such a shared red, so each map is also compared with the
mean of the 9 captions' maps: which cell does the caption's word raise most? Prints, for each named cell, the
reddest cell, the contrast (named cell minus the mean of the others) and the most raised cell, and how many of
the 9 named cells are the reddest and the most raised.

    python tools/shapes_layout_probe.py paragen/pipelines/configs/tiny-shapes-dit [--noises 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root
from tools.shapes_world import CELLS  # noqa: E402
from tools.train_shapes import SIDE, predict  # noqa: E402

T = 951  # the first timestep of 20 DDIM steps ("leading" spacing, offset 1)


@torch.no_grad()
def redness_by_cell(pipe, cell: str, noises: int) -> np.ndarray:
    """3 × 3 mean redness of the decoded mean clean-latent prediction at t = T for the red square at `cell`."""
    parts = {k: v for k, v in pipe.components.items() if k in ("unet", "transformer", "text_encoder", "tokenizer")}
    side = SIDE // pipe.vae_scale_factor
    x = torch.randn(noises, pipe.vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    out = predict(parts, x, torch.full((noises,), T), [f"a large red square at the {cell}"] * noises)
    alpha = pipe.scheduler.alphas_cumprod[T]
    if pipe.scheduler.config.prediction_type == "v_prediction":
        clean = alpha.sqrt() * x - (1 - alpha).sqrt() * out
    else:
        clean = (x - (1 - alpha).sqrt() * out) / alpha.sqrt()
    picture = pipe.vae.decode(clean.mean(0, keepdim=True) / pipe.vae.config.scaling_factor).sample[0]
    red = (picture[0] - (picture[1] + picture[2]) / 2).numpy()
    edges = np.linspace(0, SIDE, 4).round().astype(int)
    return np.array([[red[edges[i]:edges[i + 1], edges[j]:edges[j + 1]].mean() for j in range(3)] for i in range(3)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a tiny-shapes or tiny-shapes-dit pipeline folder")
    p.add_argument("--noises", type=int, default=8)
    args = p.parse_args()
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    pipe = DiffusionPipeline.from_pretrained(args.folder, local_files_only=True, dtype=torch.float32)
    grids = {cell: redness_by_cell(pipe, cell, args.noises) for cell in sorted(CELLS)}
    shared = np.mean(list(grids.values()), axis=0)  # what the model draws whatever the cell word says
    hits = relative_hits = 0
    for cell, grid in grids.items():
        row, column = CELLS[cell]
        reddest = tuple(int(i) for i in np.unravel_index(grid.argmax(), grid.shape))
        relative = grid - shared
        most_raised = tuple(int(i) for i in np.unravel_index(relative.argmax(), relative.shape))
        contrast = grid[row, column] - np.delete(grid.ravel(), row * 3 + column).mean()
        hits += reddest == (row, column)
        relative_hits += most_raised == (row, column)
        print(f"{cell:>12}: reddest cell {reddest}, named cell's contrast {contrast:+.3f}, "
              f"most raised above the 9 captions' mean {most_raised}")
    print(f"named cell reddest in {hits} of 9; most raised by its word in {relative_hits} of 9")


if __name__ == "__main__":
    main()

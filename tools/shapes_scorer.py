"""Score a picture against its shapes-world caption (issue 18): find the shapes, then compare.

Finding: every pixel takes the nearest of the world's shape colours and background tones (RGB distance); pixels
of a shape colour within `MAX_DISTANCE` form connected regions (4-neighbours); a region smaller than
`MIN_AREA` of the picture is noise. A region's shape: a triangle (apex up) when its top quarter is less than
`TRIANGLE_TAPER` as wide as its bottom quarter; otherwise a square or a circle by how much of its bounding box it
fills (about 1 against π/4). Both tests hold on pictures blurred by a VAE, where a triangle's tip rounds off and
its fill rises towards a circle's. Its place is its centroid's cell of the 3 × 3 grid.
Comparing: each object the caption names is matched by a found object of the same colour, shape and cell (each
found object used once); the picture is correct when every named object is matched and nothing else was
found. Softer, `placed` counts the named objects whose colour is found in their cell, whatever its shape.
`copies` counts, for each named (colour, shape), the found objects of that colour and shape — more than the
caption names is a duplicated object, the failure ASGDiffusion's structure guidance is meant to prevent.

    python tools/shapes_scorer.py PICTURE.png "a small red circle at the top left"
"""
from __future__ import annotations

import sys
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root
from tools.shapes_world import BACKGROUNDS, COLOURS, cell_name, parse_caption  # noqa: E402

MAX_DISTANCE = 100.0  # RGB distance within which a pixel counts as a shape colour
MIN_AREA = 0.005  # of the picture: a quarter of the smallest object the world draws
TRIANGLE_TAPER = 0.5  # top quarter's width / bottom quarter's below which a region is a triangle (1/7 drawn, ~0.25 decoded)
SQUARE_FILL = 0.86  # fill of the bounding box at or above which a region is a square, not a circle


@dataclass(frozen=True)
class Found:
    """A shape found in a picture."""

    colour: str
    shape: str
    cell: str
    area: int


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of a boolean mask, each as an array of (row, column) pixels."""
    seen = np.zeros_like(mask)
    height, width = mask.shape
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        regions.append(np.array(pixels))
    return regions


def _shape(rows: np.ndarray, fill: float) -> str:
    """A region's shape from its pixels' rows and the fraction of its bounding box it fills."""
    band = max(1, (rows.max() - rows.min() + 1) // 4)
    top, bottom = (rows < rows.min() + band).sum(), (rows > rows.max() - band).sum()
    if top < TRIANGLE_TAPER * bottom:
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def find_objects(image: Image.Image) -> list[Found]:
    """The shapes in a picture."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width, _ = pixels.shape
    names = list(COLOURS) + list(BACKGROUNDS)
    palette = np.array([COLOURS[n] for n in COLOURS] + [BACKGROUNDS[n] for n in BACKGROUNDS], dtype=np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
    nearest = distance.argmin(-1)
    close = distance.min(-1) <= MAX_DISTANCE
    found = []
    for index, colour in enumerate(names[: len(COLOURS)]):
        for region in _regions((nearest == index) & close):
            if len(region) < MIN_AREA * height * width:
                continue
            rows, cols = region[:, 0], region[:, 1]
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            shape = _shape(rows, len(region) / box)
            row = min(2, int(rows.mean() * 3 / height))
            column = min(2, int(cols.mean() * 3 / width))
            found.append(Found(colour, shape, cell_name(row, column), len(region)))
    return found


def _pair_off(wanted: list[tuple], have: list[tuple]) -> tuple[int, list[tuple]]:
    """How many of `wanted` find an equal item in `have`, each item used once; and the items left over."""
    left = list(have)
    hits = 0
    for item in wanted:
        if item in left:
            left.remove(item)
            hits += 1
    return hits, left


def score(image: Image.Image, caption: str) -> dict:
    """How well a picture shows its caption: matched objects, extras, copies of each named object."""
    named = parse_caption(caption)
    found = find_objects(image)
    matched, unused = _pair_off(named, [(f.colour, f.shape, f.cell) for f in found])
    placed, _ = _pair_off([(colour, cell) for colour, _, cell in named], [(f.colour, f.cell) for f in found])
    wanted = Counter((colour, shape) for colour, shape, _ in named)
    have = Counter((f.colour, f.shape) for f in found)
    copies = {f"{colour} {shape}": have[(colour, shape)] for colour, shape in wanted}
    return {
        "named": len(named),
        "matched": matched,
        "placed": placed,
        "extra": len(unused),
        "correct": matched == len(named) and not unused,
        "copies": copies,
        "duplicated": any(have[key] > count for key, count in wanted.items()),
        "found": [f.__dict__ for f in found],
    }


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(score(Image.open(sys.argv[1]), sys.argv[2]))

"""The procedural shapes world (issue 18): scenes of a few filled shapes, their captions, and their pictures.

A scene holds one to `MAX_OBJECTS` shapes — a circle, a square or a triangle, in one of four colours, small or
large — each in its own cell of a 3 × 3 grid, on a plain or two-tone (upper half, lower half) background whose
tones are never one of the shape colours. Its caption says what is where, in a fixed grammar:
"a small red circle at the top left and a large blue square at the bottom". Pictures are drawn with PIL,
deterministically from the scene. `tools/shapes_scorer.py` reads pictures back; training draws scenes from
`sample_scene` with a seeded generator.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 200, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128), "black": (25, 25, 25)}
SIZES = {"small": 0.2, "large": 0.3}  # the shape's side (or diameter) as a fraction of the picture's side
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")
MAX_OBJECTS = 2


def cell_name(row: int, column: int) -> str:
    """The words of cell (row, column): "top left", "top", "center", "right", …"""
    if row == 1 and column == 1:
        return "center"
    if row == 1:
        return COLUMNS[column]
    if column == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLUMNS[column]}"


CELLS = {cell_name(r, c): (r, c) for r in range(3) for c in range(3)}


@dataclass(frozen=True)
class Shape:
    """One object of a scene; `offset` moves it inside its cell (fractions of the free room, -1 to 1)."""

    shape: str
    colour: str
    size: str
    cell: str
    offset: tuple[float, float] = (0.0, 0.0)

    @property
    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.cell}"


@dataclass(frozen=True)
class Scene:
    """What a picture shows: its objects and its background tones (upper half, lower half)."""

    objects: tuple[Shape, ...]
    background: tuple[str, str]


def sample_scene(rng: random.Random, max_objects: int = MAX_OBJECTS) -> Scene:
    """A random scene: 1 to `max_objects` objects in distinct cells, plain or two-tone background."""
    cells = rng.sample(sorted(CELLS), rng.randint(1, max_objects))
    objects = tuple(
        Shape(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(sorted(SIZES)), cell,
              (rng.uniform(-1, 1), rng.uniform(-1, 1)))
        for cell in cells
    )
    upper = rng.choice(sorted(BACKGROUNDS))
    lower = upper if rng.random() < 0.5 else rng.choice(sorted(BACKGROUNDS))
    return Scene(objects, (upper, lower))


def caption(scene: Scene) -> str:
    """The scene's caption: its objects in the order they were placed, joined by "and"."""
    return " and ".join(obj.words for obj in scene.objects)


def render(scene: Scene, side: int) -> Image.Image:
    """The scene drawn as an RGB picture `side` pixels square."""
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background[0]])
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, side // 2, side - 1, side - 1], fill=BACKGROUNDS[scene.background[1]])
    cell = side / 3
    for obj in scene.objects:
        row, column = CELLS[obj.cell]
        extent = SIZES[obj.size] * side
        room = (cell - extent) / 2  # how far the shape may move from the cell's centre and stay inside it
        cx = (column + 0.5) * cell + obj.offset[0] * room
        cy = (row + 0.5) * cell + obj.offset[1] * room
        box = [cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2]
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    return image


def parse_caption(text: str) -> list[tuple[str, str, str]]:
    """(colour, shape, cell) of every object a caption names; ValueError for a caption outside the grammar."""
    named = []
    for part in text.split(" and "):
        words = part.split()
        if len(words) < 6 or words[0] != "a" or words[4:6] != ["at", "the"]:
            raise ValueError(f"not a shapes-world caption: {part!r}")
        size, colour, shape, cell = words[1], words[2], words[3], " ".join(words[6:])
        if size not in SIZES or colour not in COLOURS or shape not in SHAPES or cell not in CELLS:
            raise ValueError(f"not a shapes-world caption: {part!r}")
        named.append((colour, shape, cell))
    return named

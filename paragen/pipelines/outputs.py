"""Outputs are written by one rank, atomically: a temporary file in the same folder, then a rename,
so a crashed or failed run never leaves a partial file that looks like a result."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from PIL import Image


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically."""
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def save_json(data: Any, path: Path) -> Path:
    """Write indented JSON atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))

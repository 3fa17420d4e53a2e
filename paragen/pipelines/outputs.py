"""Outputs (PNG, JSON, MP4/GIF) are written by one rank, atomically: a temporary file in the same folder, then a rename,
so a crashed or failed run never leaves a partial file that looks like a result."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
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


VIDEO_FORMATS = ("mp4", "gif")


def save_video(frames: np.ndarray, path: Path, fps: int) -> Path:
    """Write `[frames, H, W, 3]` floats in [0, 1] atomically: MP4 (H.264, through the ffmpeg binary of the
    `imageio-ffmpeg` package) when `path` ends in .mp4, an animated GIF (Pillow) when it ends in .gif.
    ImportError if MP4 is asked for and imageio-ffmpeg is missing."""
    pixels = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    if path.suffix == ".gif":
        images = [Image.fromarray(frame) for frame in pixels]
        return write_atomic(path, lambda tmp: images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0))
    import imageio_ffmpeg

    def write(tmp: Path) -> None:
        height, width = pixels.shape[1:3]
        writer = imageio_ffmpeg.write_frames(str(tmp), (width, height), fps=fps, codec="libx264", quality=8,
                                             macro_block_size=2, output_params=["-f", "mp4"], ffmpeg_log_level="error")
        writer.send(None)
        for frame in pixels:
            writer.send(np.ascontiguousarray(frame))
        writer.close()

    return write_atomic(path, write)


def mp4_available() -> bool:
    """Whether MP4 can be written here (the imageio-ffmpeg package and its ffmpeg binary are installed)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return True
    except (ImportError, RuntimeError):
        return False

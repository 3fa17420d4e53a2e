"""Outputs (PNG, JSON, MP4/GIF) are written by one rank, atomically: a temporary file in the same folder, then a rename,
so a crashed or failed run never leaves a partial file that looks like a result. Files get the mode any new file
gets (0666 less the umask), like the output of any other program."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image


def check_out_dir(out_dir: str) -> None:
    """Refuse, before any work, an output folder that cannot be made: an existing file, a file on its path, or a
    folder this user cannot write in (ValueError naming it)."""
    path = Path(out_dir)
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        where = "" if existing == path else f" cannot be created: {str(existing)!r}"
        raise ValueError(f"--out {out_dir!r}{where} is a file, not a folder; name a folder (it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out_dir!r}: no permission to write in {str(existing)!r}; "
                         "name a folder you can write in")


def _new_temp_file(path: Path) -> Path:
    """A new empty file next to `path`, created with mode 0666 so that the umask alone decides its permissions."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue  # another writer drew the same name: draw again


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path next to `path`, then rename it into place (the temporary file is
    removed if anything fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path)
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

"""Outputs (PNG, JSON, MP4/GIF) are written by one rank, atomically and durably: a temporary file in the same folder,
fsynced, renamed into place, then the folder fsynced, so neither a failed run nor a crash of the node (power loss,
kernel panic) leaves a partial file that looks like a result. Files get the mode any new file gets (0666 less the
umask), like the output of any other program."""
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


def _fsync(path: Path, flags: int = 0) -> None:
    """Flush what the kernel holds of `path` (opened read-only with `flags`) to the disk."""
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush the entries of folder `path` to the disk, so that a file created, renamed or removed in it stays so
    after a crash (fsyncing the file itself does not make its name durable)."""
    _fsync(path, os.O_DIRECTORY)


def _make_folders(folder: Path) -> None:
    """Create `folder` and its missing parents durably: each new folder's parent is fsynced once it exists."""
    missing = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for made in reversed(missing):
        fsync_dir(made.parent)


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path next to `path`, fsync its data (reopened: writers write by path), rename
    it into place and fsync the folder, so that after a crash `path` is either the old file or the whole new one
    (the temporary file is removed if anything fails)."""
    _make_folders(path.parent)
    tmp = _new_temp_file(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def append_durable(path: Path, line: str) -> None:
    """Append `line` and a newline to `path` in one write and fsync it (its folder too when the file is new, made
    with mode 0666 less the umask, in folders made as needed), so that the line survives a crash once this returns.
    ValueError if `line` holds a newline: it would be read back as two lines."""
    if "\n" in line:
        raise ValueError(f"append_durable writes one line; {line[:80]!r} holds a newline")
    _make_folders(path.parent)
    created = not path.exists()
    with open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666), "ab") as file:
        file.write(f"{line}\n".encode())
        file.flush()
        os.fsync(file.fileno())
    if created:
        fsync_dir(path.parent)


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

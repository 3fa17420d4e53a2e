"""What the offline tokenizer generators share: writing a tokenizer folder's JSON files, and their command line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_json_files(folder: Path, files: dict[str, dict]) -> None:
    """Each `name -> data` as `folder/name`, indented, UTF-8, with a final newline (deterministic)."""
    for name, data in files.items():
        with open(folder / name, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")


def write_folders(argv: list[str], default: list[Path], write: Callable[[Path], None], tokens: Callable[[], int]) -> None:
    """Write the folders named on the command line, else the `default` ones, saying each one's vocabulary size."""
    for folder in [Path(a) for a in argv] or default:
        write(folder)
        print(f"wrote {folder} ({tokens()} tokens)")

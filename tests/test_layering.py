"""The package's layering, read from its imports: launch → pipelines → parallel → comms/kernels, and
torch.distributed only in comms/ (and the bootstrap in launch/)."""
import ast
import subprocess
import sys
from pathlib import Path

import paragen

PACKAGE = Path(paragen.__file__).parent
LAYERS = {"launch": 3, "pipelines": 2, "parallel": 1, "comms": 0, "kernels": 0}
# Shared by every layer: logging. The top-level package (`paragen/__init__.py`) is the public API.
ANYWHERE = {"log"}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _layer(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_nothing_imports_upward():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        layer = _layer(path)
        if layer not in LAYERS:
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "paragen" and len(parts) > 1 and parts[1] not in ANYWHERE:
                if LAYERS.get(parts[1], 99) > LAYERS[layer]:
                    upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not upward, "\n".join(upward)


def test_only_comms_and_the_bootstrap_use_torch_distributed():
    users = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if any(name.startswith("torch.distributed") for name in _imports(path)))
    assert all(user.startswith("comms/") for user in users if user not in {"launch/process_group.py", "launch/cli.py"}), users


def test_slurm_and_help_import_no_diffusers():
    code = ("import sys, contextlib, io\nfrom paragen.launch.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['slurm', '--nodes', '1', '--gpus-per-node', '2', '--', 'image'])\n"
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"

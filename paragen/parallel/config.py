"""`ParallelConfig`: how many ranks one request is cut into along each dimension — degrees only.

How a workload uses its ranks (the exchange mode of patch and sequence parallelism, the hires windows,
the temporal attention of clips, the KV store of a causal LM) is that workload's own typed options;
`ExchangeConfig` here is the one shared by UNet patch parallelism and DiT sequence parallelism.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

MODES = ("sync", "displaced", "partial")
MODE_HELP = {
    "sync": "every exchange fresh and blocking; equals the single-device output (the reference)",
    "displaced": "DistriFusion: after the warm-up steps, other bands' (or token shards') activations come "
    "from the previous step, gathered asynchronously behind a whole step of compute",
    "partial": "PCPP (UNet models): like displaced, but attention sees only a fraction of the two "
    "neighbouring bands' rows, sent point-to-point (far less traffic, some quality cost)",
}
DEGREES = ("cfg", "clip", "patch", "ulysses", "ring", "seq", "tp")
FILLABLE = ("clip", "patch", "ring", "seq")  # degrees that may be left out and take the ranks left over
# Without a workload to say which degrees it splits by: a causal-LM layout when seq or tp is given, else a
# diffusion layout; the first degree of each takes the ranks left over.
DIFFUSION_DEGREES = ("cfg", "clip", "patch", "ulysses", "ring")
LM_DEGREES = ("seq", "tp")
_FILL = {DIFFUSION_DEGREES: "patch", LM_DEGREES: "seq"}
# Workload options that older releases took as ParallelConfig fields (still accepted, with a warning).
_LEGACY = {"mode": "ExchangeConfig", "warmup_steps": "ExchangeConfig", "partial_fraction": "ExchangeConfig",
           "hires": "HiresConfig", "temporal": "TemporalAttention"}


@dataclass(frozen=True)
class ExchangeConfig:
    """How patch-parallel (UNet) and sequence-parallel (DiT) layers exchange activations.

    - `mode`: `MODES`; in `displaced` and `partial` the first `warmup_steps` denoising steps of every
      request run exact (synchronous) and the stale steps start at step `warmup_steps` (0-based).
      DistriFusion counts differently: its `warmup_steps=k` runs k + 1 exact steps, so its default 4
      is paragen's 5;
    - `partial_fraction`: `partial` mode: the share of each neighbouring band's rows attention sees.
    """

    mode: str = "sync"
    warmup_steps: int = 4
    partial_fraction: float = 0.3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        least = 0 if self.mode == "sync" else 1  # the first stale step reads what an exact step left
        if self.warmup_steps < least:
            raise ValueError(f"warmup_steps must be at least {least}"
                             + (f" in {self.mode} mode: its first step has no earlier step's data to read"
                                if least else "") + f", got {self.warmup_steps}")
        if not 0.0 < self.partial_fraction <= 1.0:
            raise ValueError(f"partial_fraction must be in (0, 1], got {self.partial_fraction}")

    @property
    def tag(self) -> str:
        """What these options add to a run's file names (after the workload's degrees): the mode."""
        return self.mode


@dataclass(frozen=True, init=False)
class ParallelConfig:
    """Parallel degrees, checked against the world size by `resolve`.

    - `cfg`: 1, or 2 to run the classifier-free-guidance branches on different ranks;
    - `patch`: row bands of a UNet's latent (patch parallelism), or the ranks sharing hires windows;
    - `ulysses`, `ring`: sequence parallelism of a diffusion transformer's image tokens — all-to-all
      to head shards (Ulysses) and K/V passed around a ring (Ring); `ulysses × ring` shards in all;
    - `clip`: contiguous clips of a video's frames, one per rank;
    - `seq`, `tp` (causal LMs): the prompt cut into `seq` contiguous shards whose K/V ring attention
      passes around, each shard's weights split over `tp` ranks by tensor parallelism.

    `patch`, `ring`, `clip` and `seq` may be left out (None, or -1): the workload's fill degree then takes
    the ranks the others leave, the rest are 1. Which degrees a workload splits by is the workload's declaration
    (`paragen.pipelines.registry`); `resolve` applies it.

    The workload options older releases took here (`mode`, `warmup_steps`, `partial_fraction`,
    `hires`, `temporal`) are still accepted with a `DeprecationWarning`; pass them to `parallelize`.
    """

    cfg: int = 1
    patch: int | None = None
    ulysses: int = 1
    ring: int | None = None
    clip: int | None = None
    seq: int | None = None
    tp: int = 1

    def __init__(self, cfg: int = 1, patch: int | None = None, ulysses: int = 1, ring: int | None = None,
                 clip: int | None = None, seq: int | None = None, tp: int = 1, **legacy: Any) -> None:
        values = {"cfg": cfg, "patch": patch, "ulysses": ulysses, "ring": ring, "clip": clip, "seq": seq, "tp": tp}
        for name, value in values.items():
            object.__setattr__(self, name, None if value == -1 and name in FILLABLE else value)
        object.__setattr__(self, "_legacy", _legacy_options(legacy))
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg must be 1 or 2 (conditional and unconditional branch), got {self.cfg}")
        for name in DEGREES[1:]:
            value = getattr(self, name)
            if value is not None and value < 1:
                left_over = " or -1 (the ranks left over)" if name in FILLABLE else ""
                raise ValueError(f"{name} must be a positive degree{left_over}, got {value}")

    @property
    def legacy_options(self) -> Any:
        """The workload options given the deprecated way (as fields of this config), or None."""
        return self._legacy  # type: ignore[attr-defined]

    @property
    def sequence(self) -> int:
        """Token shards of a diffusion transformer: `ulysses × ring` (of a resolved config)."""
        return (self.ulysses or 1) * (self.ring or 1)

    def is_resolved(self, world_size: int) -> bool:
        """Every degree concrete and their product the world size."""
        degrees = [getattr(self, name) for name in DEGREES]
        return None not in degrees and math.prod(degrees) == world_size

    def resolve(self, world_size: int, uses: tuple[str, ...] | None = None, fill: str | None = None,
                refusal: str = "") -> "ParallelConfig":
        """A copy with every degree concrete, checked against `world_size`.

        `uses`: the degrees the workload splits by (the others must be left out or 1; `refusal` says why
        in the error), `fill`: the one that takes the ranks the others leave when it is not given. Without
        them: `LM_DEGREES` when seq or tp is given, else `DIFFUSION_DEGREES`. Errors name every factor.
        """
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        if uses is None:
            uses = LM_DEGREES if (self.seq or 1) > 1 or self.tp > 1 else DIFFUSION_DEGREES
            fill = _FILL[uses]
        for name in DEGREES:
            value = getattr(self, name)
            if name not in uses and value not in (None, 1):
                raise ValueError(f"{name}={value}: {refusal or 'this layout splits by ' + ', '.join(uses) + ' only'}")
        if self.cfg == 2 and world_size % 2:
            raise ValueError(f"cfg=2 splits the ranks into two branches and needs an even world size; got {world_size}")
        degrees = {name: getattr(self, name) or 1 for name in DEGREES}
        if fill is not None and getattr(self, fill) is None:
            taken = math.prod(v for name, v in degrees.items() if name != fill)
            degrees[fill] = max(1, world_size // taken)
        product = math.prod(degrees.values())
        if product != world_size:
            factors = " × ".join(f"{name} ({degrees[name]})" for name in uses)
            raise ValueError(f"parallel degrees do not match the world size: {factors} = {product}, "
                             f"but the world size is {world_size}")
        resolved = dataclasses.replace(self, **degrees)
        object.__setattr__(resolved, "_legacy", self.legacy_options)
        return resolved


def _legacy_options(legacy: dict[str, Any]) -> Any:
    """The workload options of the deprecated `ParallelConfig` fields, or None (warns once per call)."""
    unknown = sorted(set(legacy) - set(_LEGACY))
    if unknown:
        raise TypeError(f"ParallelConfig got unexpected arguments {', '.join(unknown)}")
    if not legacy:
        return None
    kinds = {_LEGACY[name] for name in legacy}
    if len(kinds) > 1:
        raise ValueError(f"{', '.join(sorted(legacy))} belong to different workloads; pass one options object "
                         "to paragen.parallelize")
    kind = kinds.pop()
    warnings.warn(f"ParallelConfig({', '.join(f'{k}=...' for k in legacy)}) is deprecated: ParallelConfig holds "
                  f"degrees only; pass the options as paragen.parallelize(pipe, config, {kind}(...))",
                  DeprecationWarning, stacklevel=3)
    if kind == "ExchangeConfig":
        return ExchangeConfig(**legacy)
    return legacy["hires" if kind == "HiresConfig" else "temporal"]

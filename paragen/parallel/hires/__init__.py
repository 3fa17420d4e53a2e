"""High resolution beyond the training size: windows over the ranks, low-resolution structure guidance."""
from paragen.parallel.hires.config import GUIDANCE_MODES, PLACEMENTS, HiresConfig

__all__ = ["GUIDANCE_MODES", "HiresConfig", "PLACEMENTS"]

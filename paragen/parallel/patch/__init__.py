"""Patch parallelism: layers that run on a row band of an image and exchange what they need."""
from paragen.parallel.patch.attention import (
    PatchCrossAttnProcessor,
    PatchSelfAttnProcessor,
    check_processor,
)
from paragen.parallel.patch.context import PatchContext
from paragen.parallel.patch.conv import PatchConv2d, PatchInputConv2d
from paragen.parallel.patch.norm import PatchGroupNorm

__all__ = [
    "PatchConv2d", "PatchContext", "PatchCrossAttnProcessor", "PatchGroupNorm", "PatchInputConv2d",
    "PatchSelfAttnProcessor", "check_processor",
]

"""Clip parallelism for video models: frames cut into contiguous clips, one per rank (Video-Infinity)."""
from paragen.parallel.clip.config import SCOPE_HELP, SCOPES, TemporalAttention
from paragen.parallel.clip.layout import ClipLayout, global_frame_indices, plan_clips

__all__ = ["SCOPE_HELP", "SCOPES", "ClipLayout", "TemporalAttention", "global_frame_indices", "plan_clips"]

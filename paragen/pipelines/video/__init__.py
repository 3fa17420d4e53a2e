"""Workload `video`: TextToVideoSD and AnimateDiff with a video's frames cut into clips, one per rank, whose
temporal attention sees the other clips (dual scope: local window + global frames, Video-Infinity)."""
from paragen.pipelines.video.runtime import VideoRuntime, check, check_request, install

__all__ = ["VideoRuntime", "check", "check_request", "install"]

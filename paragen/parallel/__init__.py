"""How work is cut: the parallel config, the mesh of named groups, partition maths, parallel layers."""
from paragen.parallel.clip import TemporalAttention
from paragen.parallel.config import MODES, ExchangeConfig, ParallelConfig
from paragen.parallel.hires import HiresConfig
from paragen.parallel.mesh import ParallelMesh

__all__ = ["ExchangeConfig", "HiresConfig", "MODES", "ParallelConfig", "ParallelMesh", "TemporalAttention"]

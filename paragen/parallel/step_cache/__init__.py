"""Step caching (First-Block Cache, TeaCache, TaylorSeer) that every parallel mode runs alike: decisions agreed over
the ranks, values kept per shard."""
from paragen.parallel.step_cache.config import LIMITS, METHOD_HELP, METHODS, StepCacheConfig, check_step_cache
from paragen.parallel.step_cache.decide import Site, StepCache
from paragen.parallel.step_cache.hooks import BlockIO, CachePlan, install

__all__ = ["BlockIO", "CachePlan", "LIMITS", "METHODS", "METHOD_HELP", "Site", "StepCache", "StepCacheConfig",
           "check_step_cache", "install"]

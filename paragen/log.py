"""One logger for the whole package, with every line prefixed by the rank.

Ranks other than the output rank log warnings and errors only, so a 64-rank job prints one copy of
the progress, not 64.
"""
from __future__ import annotations

import logging
import sys

_LOGGER_NAME = "paragen"
_warned: set[str] = set()


def get_logger() -> logging.Logger:
    """The package logger (configure it once with `setup_logging`)."""
    return logging.getLogger(_LOGGER_NAME)


def setup_logging(rank: int, is_output_rank: bool, verbose: bool = False) -> None:
    """Prefix lines with the rank; quiet ranks other than the output rank down to warnings."""
    logger = get_logger()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    if verbose:
        logger.setLevel(logging.DEBUG)
    else:
        logger.setLevel(logging.INFO if is_output_rank else logging.WARNING)


def warn_once(message: str) -> None:
    """Log a warning the first time this exact message is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        get_logger().warning(message)

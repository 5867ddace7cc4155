"""The only layer that touches transformers internals at run time."""

from .patch import TrimState, get_state, install, uninstall
from .trim import POSITION_MODES, SegmentStats, Trimmed, TrimStats, trim

__all__ = [
    "POSITION_MODES",
    "SegmentStats",
    "TrimState",
    "TrimStats",
    "Trimmed",
    "get_state",
    "install",
    "trim",
    "uninstall",
]

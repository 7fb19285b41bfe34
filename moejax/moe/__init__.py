"""The MoE layer and its parts (docs/architecture.md)."""

from moejax.moe.layer import MoELayer
from moejax.moe.types import Assignment, SoftAssignment

__all__ = ["Assignment", "MoELayer", "SoftAssignment"]

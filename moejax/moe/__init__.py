"""The MoE layer and its parts (DESIGN section 2)."""

from moejax.moe.layer import MoELayer
from moejax.moe.types import Assignment, SoftAssignment

__all__ = ["Assignment", "MoELayer", "SoftAssignment"]

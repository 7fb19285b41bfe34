"""Mesh axis names, shared by the mesh builder and the MoE dispatch (no imports)."""

AXES = ("data", "fsdp", "expert")
# The batch / token dimension is split over every axis; expert parallelism
# re-partitions tokens by expert inside the MoE layer.
TOKEN_AXES = AXES
EXPERT_AXIS = "expert"

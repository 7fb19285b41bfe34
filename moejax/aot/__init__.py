"""Ahead-of-time compilation for accelerators from a CPU host.

`topology.py`: TPU slices as compile-only devices (needs libtpu: `pip
install -e '.[tpu]'`) and what is known of each chip; `train_step.py`: a
config's training step compiled for a slice (per-chip memory, FLOPs,
compile time, whether it fits) or lowered for a GPU. `tools/aot_compile.py`
is the command line (it prints the table of configs x topologies).
"""

"""Device meshes, parameter/batch shardings and multi-host initialisation.

`mesh.py` turns `parallel.{data,fsdp,expert}` into a `jax.sharding.Mesh`
with axes ('data', 'fsdp', 'expert') and gives every parameter its
PartitionSpec; `distributed.py` starts `jax.distributed` for multi-host runs.
The expert-parallel dispatch itself lives in `moejax/moe/dispatch/expert_parallel.py`.
"""

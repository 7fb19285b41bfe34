"""One process of a (possibly multi-host) tiny training run, for tests.

python -m tests.parallel.host_worker WORKDIR DEVICES NUM_PROCESSES PROCESS_ID PORT STOP_AT

Sets XLA_FLAGS for DEVICES fake CPU devices, starts jax.distributed when
NUM_PROCESSES > 1 (coordinator 127.0.0.1:PORT), trains the tiny config on a
(data=2, expert=4) mesh with 2 data shards for 5 steps, and prints the
trainer's result as one JSON line. STOP_AT > 0 sends this process SIGTERM
just before that step (as a preemption notice reaching one host only).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
  workdir, devices, n_proc, pid, port, stop_at = argv
  from tests.conftest import fake_devices  # noqa: PLC0415
  os.environ["XLA_FLAGS"] = fake_devices(int(devices), {})["XLA_FLAGS"]
  from moejax.parallel import distributed  # noqa: PLC0415
  distributed.initialize(f"127.0.0.1:{port}", int(n_proc), int(pid))
  import json  # noqa: PLC0415
  import signal  # noqa: PLC0415

  from moejax.train import trainer  # noqa: PLC0415
  from tests.conftest import tiny_config  # noqa: PLC0415

  cfg = tiny_config()
  cfg.model.dtype = "float32"
  cfg.train.steps, cfg.train.log_every = 5, 1
  cfg.train.eval_every, cfg.train.checkpoint_every = 5, 5
  cfg.train.eval_batches = 1
  cfg.parallel.expert = 4
  cfg.data.shards = 2

  def hook(step: int, batch: dict) -> dict:
    if step == int(stop_at):
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  out = trainer.train(cfg, workdir, batch_hook=hook)
  print(json.dumps({"result": out}))


if __name__ == "__main__":
  main(sys.argv[1:])

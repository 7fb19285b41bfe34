"""Published scaling-law measurements shipped as package data (`reference_data/`).

They let the fitter be checked against published fits on any install, a bare
clone or `pip install` on Colab alike; provenance, columns and licences are in
`reference_data/README.md`.
"""

from __future__ import annotations

import importlib.resources
import pathlib

import numpy as np

from moejax.scaling.data import read_table

# Table name -> file in reference_data/.
FILES: dict[str, str] = {
    "chinchilla_epoch": "chinchilla_epoch.csv",
    "clark2022_final_step": "clark2022_final_step.csv",
    "clark2022_curves": "clark2022_curves.csv.gz",
}
NAMES: tuple[str, ...] = tuple(FILES)


def reference_path(name: str) -> pathlib.Path:
  """Path of the bundled table `name` (e.g. "chinchilla_epoch"; its file name works too).

  moejax installs as plain files (editable or wheel), so this is a real path
  that `read_table`, pandas or a CLI can open.
  """
  by_file = {f: f for f in FILES.values()}
  fname = FILES.get(name) or by_file.get(name)
  if fname is None:
    raise ValueError(f"reference_path: name={name!r} is not a bundled reference table; "
                     f"allowed: {list(NAMES)}")
  path = importlib.resources.files("moejax.scaling") / "reference_data" / fname
  return pathlib.Path(str(path))


def read_reference(name: str) -> dict[str, np.ndarray]:
  """Columns of the bundled table `name` (see `read_table` for the column types)."""
  return read_table(str(reference_path(name)))

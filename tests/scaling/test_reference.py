"""The published tables shipped in moejax/scaling/reference_data, and --csv by table name."""

from __future__ import annotations

import pytest

from moejax.scaling.reference import NAMES, read_reference, reference_path
from tests.scaling.test_cli import _tool

# Rows and a few columns of each table, as documented in reference_data/README.md.
SHAPES = {"chinchilla_epoch": (245, {"N_params", "D_tokens", "C_flops", "loss"}),
          "clark2022_final_step": (223, {"router_type", "num_experts", "loss_validation"}),
          "clark2022_curves": (5799, {"hyper_id", "step", "loss_validation"})}


@pytest.mark.parametrize("name", NAMES)
def test_every_table_is_shipped_and_readable(name):
  path = reference_path(name)
  assert path.is_file() and path.parent.name == "reference_data"
  assert reference_path(path.name) == path  # the file name works too
  rows, some_columns = SHAPES[name]
  t = read_reference(name)
  assert len(t["loss_validation" if "clark" in name else "loss"]) == rows
  assert some_columns <= set(t)


def test_unknown_name_lists_the_allowed_ones():
  with pytest.raises(ValueError, match=r"name='chinchilla'.*chinchilla_epoch.*clark2022_curves"):
    reference_path("chinchilla")


def test_cli_csv_takes_a_table_name(tmp_path):
  d = _tool().main(["--law", "chinchilla", "--csv", "chinchilla_epoch",
                    "--where", "epoch_outlier_excluded==0", "--col", "N=N_params",
                    "--col", "D=D_tokens", "--col", "L=loss", "--max_starts", "2",
                    "--out", str(tmp_path / "fit.json")])
  assert d["n_points"] == 240
  assert d["extras"]["csv"] == str(reference_path("chinchilla_epoch"))
  with pytest.raises(SystemExit, match="--csv: .*chinchilla_epoch"):
    _tool().main(["--law", "chinchilla", "--csv", str(tmp_path / "missing.csv"),
                  "--out", str(tmp_path / "x.json")])

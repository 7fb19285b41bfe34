"""Post-training MoE compression: calibration statistics, then methods that shrink a run.

`calibrate` (calibrate.py) runs a model over calibration text and records
what every MoE layer routes and receives; `prune` (prune.py) removes experts
by a criterion on those statistics. tools/compress.py writes the result as
an ordinary run directory, so methods compose by running on it again.
"""

from moejax.compress.calibrate import Calibration, calibrate
from moejax.compress.prune import CRITERIA, Pruned, prune

__all__ = ["CRITERIA", "Calibration", "Pruned", "calibrate", "prune"]

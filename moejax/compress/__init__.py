"""Post-training MoE compression: calibration statistics, then methods that shrink a run.

`calibrate` (calibrate.py) runs a model over calibration text and records
what every MoE layer routes and receives; `prune` (prune.py) removes experts
by a criterion on those statistics; `distill` (distill.py) fine-tunes a
compressed run against its uncompressed teacher; `latent` (latent.py)
factors SwiGLU experts through shared latent projections. Each method
family is one module with a `METHOD` (moejax/compress/method.py: the
contract) listed in METHODS below.
tools/compress.py writes the result as an ordinary run directory, so
methods compose by running on it again.
"""

from moejax.compress.calibrate import Calibration, calibrate
from moejax.compress.distill import METHOD as DISTILL
from moejax.compress.latent import METHOD as LATENT
from moejax.compress.merge import METHOD as MERGE
from moejax.compress.method import Method, Option, Result
from moejax.compress.prune import CRITERIA, Pruned, prune
from moejax.compress.prune import METHOD as PRUNE
from moejax.compress.quantize import METHOD as QUANTIZE

METHODS: dict[str, Method] = {m.name: m for m in (
    PRUNE,
    DISTILL,
    MERGE,
    QUANTIZE,
    LATENT,
)}

__all__ = ["CRITERIA", "METHODS", "Calibration", "Method", "Option", "Pruned", "Result",
           "calibrate", "prune"]

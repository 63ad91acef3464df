"""Per-instance perturbed losses: the engine behind SAAL.

* :mod:`saal.sharpness.engine`: options, :func:`sharpness_terms`, :func:`pool_sharpness`, the
  two-pass hook machinery, the per-batch and ``torch.func`` paths, the last-layer closed form,
  the one ascent step (:func:`ascent_step`), the one pool scoring (:func:`pool_terms`) and score
  (:meth:`PoolSharpness.score`), and the task seam (forward pass, pseudo target and per-item loss
  from a :class:`~saal.tasks.base.Task`).
* :mod:`saal.sharpness.detection`: the same for detectors, image by image, through those pieces
  (and its own fused two-pass path for FCOS and RetinaNet).
* :mod:`saal.sharpness.layer_rules`: the closed-form per-layer rules (Linear, Conv2d, BatchNorm)
  and the ``torch.func`` fallback rule.
* :mod:`saal.sharpness.naive`: :func:`naive_perturbed_losses`, the definition.
"""

from saal.sharpness.engine import (
    DEFAULT_TASK,
    ENGINES,
    GRANULARITIES,
    NORM_EPS,
    PERTURBATIONS,
    SCOPES,
    SCORE_KINDS,
    PoolSharpness,
    SharpnessTerms,
    ascent_step,
    check_option,
    check_rho,
    perturbed_losses,
    pool_sharpness,
    pool_terms,
    sharpness_terms,
)
from saal.sharpness.naive import naive_perturbed_losses

__all__ = [
    "DEFAULT_TASK",
    "ENGINES",
    "GRANULARITIES",
    "NORM_EPS",
    "PERTURBATIONS",
    "SCOPES",
    "SCORE_KINDS",
    "PoolSharpness",
    "SharpnessTerms",
    "ascent_step",
    "check_option",
    "check_rho",
    "naive_perturbed_losses",
    "perturbed_losses",
    "pool_sharpness",
    "pool_terms",
    "sharpness_terms",
]

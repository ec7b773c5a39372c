"""madam-optax: Madam, the multiplicative version of Adam, as Optax transforms.

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from madam_optax.alias import madam
from madam_optax.magnitude_bound import ClipWeightMagnitudeState
from madam_optax.magnitude_bound import clip_weight_magnitude
from madam_optax.magnitude_bound import initial_rms_bound
from madam_optax.multiplicative_step import MultiplicativeStepState
from madam_optax.multiplicative_step import multiplicative_step
from madam_optax.partition import multiplicative_labels
from madam_optax.partition import with_additive_fallback
from madam_optax.second_moment import ScaleBySecondMomentState
from madam_optax.second_moment import scale_by_second_moment

__version__ = "0.1.0"

__all__ = (
    "ClipWeightMagnitudeState",
    "MultiplicativeStepState",
    "ScaleBySecondMomentState",
    "clip_weight_magnitude",
    "initial_rms_bound",
    "madam",
    "multiplicative_labels",
    "multiplicative_step",
    "scale_by_second_moment",
    "with_additive_fallback",
)

"""madam-optax: Madam, the multiplicative version of Adam, as Optax transforms.

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from madam_optax.alias import madam
from madam_optax.lns_format import LNSFormat
from madam_optax.lns_format import REFERENCE_FORMAT
from madam_optax.lns_format import lns_decode
from madam_optax.lns_format import lns_decode_tree
from madam_optax.lns_format import lns_encode
from madam_optax.lns_format import lns_encode_tree
from madam_optax.lns_format import lns_scale
from madam_optax.lns_madam import LNSLevelStepState
from madam_optax.lns_madam import lns_level_step
from madam_optax.lns_madam import lns_madam
from madam_optax.lns_madam import lns_madam_reference
from madam_optax.lns_madam import lns_value_and_grad
from madam_optax.log_quantise import LogQuantiseState
from madam_optax.log_quantise import log_quantise
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
    "LNSFormat",
    "LNSLevelStepState",
    "LogQuantiseState",
    "MultiplicativeStepState",
    "REFERENCE_FORMAT",
    "ScaleBySecondMomentState",
    "clip_weight_magnitude",
    "initial_rms_bound",
    "lns_decode",
    "lns_decode_tree",
    "lns_encode",
    "lns_encode_tree",
    "lns_level_step",
    "lns_madam",
    "lns_madam_reference",
    "lns_scale",
    "lns_value_and_grad",
    "log_quantise",
    "madam",
    "multiplicative_labels",
    "multiplicative_step",
    "scale_by_second_moment",
    "with_additive_fallback",
)

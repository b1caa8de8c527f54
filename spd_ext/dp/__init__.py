"""Signal-aware data parallelism: g = sum_i w_i g_i with weights from online signals."""

from spd_ext.dp.aggregator import (
    MeanAggregator,
    SignalWeightedAggregator,
    WeightError,
    local_gradients,
)
from spd_ext.dp.hooks import SignalWeightingState, signal_weighted_hook
from spd_ext.dp.robust import (
    ROBUST_METHODS,
    RobustAggregator,
    centered_clipping,
    coordinate_median,
    trimmed_mean,
)
from spd_ext.dp.signals import SIGNALS, Signal, make_signal
from spd_ext.dp.weights import WEIGHT_MAPS, InverseWeights, SoftmaxWeights, make_weight_map

__all__ = [
    "ROBUST_METHODS", "SIGNALS", "WEIGHT_MAPS", "InverseWeights", "MeanAggregator",
    "RobustAggregator", "Signal",
    "SignalWeightedAggregator", "SignalWeightingState", "SoftmaxWeights", "WeightError",
    "centered_clipping", "coordinate_median", "local_gradients", "make_signal",
    "make_weight_map", "signal_weighted_hook", "trimmed_mean",
]

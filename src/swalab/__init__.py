"""swalab: Stochastic Weight Averaging for PyTorch.

A drop-in for ``torch.optim.swa_utils`` (``AveragedModel``, ``SWALR``, ``update_bn`` and the
``get_*_avg_fn`` helpers, with the same names and numbers), plus averaging rules with explicit
state, the SWA and FGE learning-rate schedules, BatchNorm recomputation for any batch format,
SWAG, FGE ensembles, model soups and calibration metrics.
"""

from . import metrics, posthoc
from .averaging import (
    EMA,
    SWA,
    AveragedModel,
    AverageState,
    AveragingRule,
    get_ema_avg_fn,
    get_ema_multi_avg_fn,
    get_swa_avg_fn,
    get_swa_multi_avg_fn,
    restart_from_average,
)
from .bn import update_bn
from .ensembles import (
    FGE,
    GreedySoup,
    ensemble_predict,
    ensemble_view,
    fge_should_collect,
    greedy_soup,
    predict_outputs,
    uniform_soup,
    weighted_soup,
)
from .schedules import (
    SWALR,
    ScheduleLR,
    constant_lr,
    cyclic_lr,
    fge_lr,
    set_lr,
    sgd_reference_lr,
    swa_reference_lr,
    swa_should_average,
)
from .swag import SWAG, bma_predict

__version__ = "0.1.0"

__all__ = [
    "FGE",
    "GreedySoup",
    "SWAG",
    "bma_predict",
    "ensemble_predict",
    "ensemble_view",
    "fge_should_collect",
    "greedy_soup",
    "metrics",
    "posthoc",
    "predict_outputs",
    "uniform_soup",
    "weighted_soup",
    "AverageState",
    "EMA",
    "SWA",
    "AveragedModel",
    "AveragingRule",
    "SWALR",
    "ScheduleLR",
    "constant_lr",
    "cyclic_lr",
    "fge_lr",
    "get_ema_avg_fn",
    "get_ema_multi_avg_fn",
    "get_swa_avg_fn",
    "get_swa_multi_avg_fn",
    "restart_from_average",
    "set_lr",
    "sgd_reference_lr",
    "swa_reference_lr",
    "swa_should_average",
    "update_bn",
]

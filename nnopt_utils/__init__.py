"""nnopt_utils: the library behind *nnopt*, an executable textbook on optimization for deep
learning. Chapters use it as ``import nnopt_utils as nu``.

One module per concept (see each module's docstring); the most used names are re-exported
here.
"""

from . import config, data, init, models, report, train
from .config import (base_seed, by_scale, derived_seed, generator, get_device, scale,
                     seed_everything, setup)
from .data import Dataset, digits, least_squares, quadratic, teacher_student
from .init import initialize
from .models import DeepLinear, mlp, residual_mlp, small_cnn
from .report import Claims, glue, loglog_slope
from .train import History, fit, sweep

__version__ = "0.1.0"

# The heavier modules load on first use: ``nu.signal``, ``nu.hessian``, ...
_LAZY = ("plotting", "signal", "normalization", "optim", "schedules", "second_order", "hessian",
         "ntk", "landscape", "pruning", "distributed", "mup")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'nnopt_utils' has no attribute {name!r}")

__all__ = [
    "config", "data", "init", "models", "plotting", "report", "train",
    "setup", "scale", "by_scale", "seed_everything", "get_device",
    "base_seed", "derived_seed", "generator",
    "Dataset", "digits", "least_squares", "quadratic", "teacher_student",
    "initialize", "mlp", "residual_mlp", "small_cnn", "DeepLinear",
    "Claims", "glue", "loglog_slope",
    "History", "fit", "sweep",
]

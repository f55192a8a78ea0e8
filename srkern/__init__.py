"""srkern: stochastic-rounding kernels for low-precision training.

One CUDA C++ source per kernel family (``kernels/``), JIT-compiled by NVRTC for GPUs and by g++
for CPUs; every random bit follows bit contract v1.1 (see README).
"""
from ._contract import CONTRACT_VERSION, STREAMS, manual_seed
from ._build import BuildError
from .cast import cast
from .accum import add_
from . import dist  # Communicator, reduce_scatter, all_gather, ShardedAdamWCore (mpi4py loaded on first use)
from .adamw import adamw_step
from .sgd import sgd_step
from .lion import lion_step
from .adafactor import adafactor_step
from .precisions import PRECISIONS, bytes_per_param
from .norm import GradNorm, grad_norm

__version__ = "0.1.0"
__all__ = ["cast", "add_", "adamw_step", "sgd_step", "lion_step", "adafactor_step", "grad_norm", "GradNorm", "bytes_per_param", "PRECISIONS", "dist",
           "manual_seed", "STREAMS", "CONTRACT_VERSION", "BuildError", "__version__"]

"""Reference catalogs: published model architectures (`models`) and GPU hardware (`hardware`)."""

from nemoc.compiler.catalog.hardware import GPUS, HardwareSpec, get_gpu
from nemoc.compiler.catalog.models import PRESETS, get_preset

__all__ = ["GPUS", "HardwareSpec", "PRESETS", "get_gpu", "get_preset"]

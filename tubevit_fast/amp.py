"""Autocast (AMP) for the custom ops: under `torch.autocast` they compute in the autocast dtype,
as PyTorch's own Conv3d and scaled_dot_product_attention do.

Autocast casts a floating-point input to its dtype unless the input is float64 (PyTorch's rule
for "lower precision" ops). The public entry points (`tubevit_fast.attention`, `TubeEmbed`) cast
with `autocast_inputs` before choosing a backend, so the backend and its self-check see the dtype
that really runs; `register_autocast` gives the raw custom ops (torch.ops.tubevit_fast.*) the
same rule on the Autocast dispatch keys, so calling them directly under autocast casts too.
Gradients flow back through the casts to the original (e.g. fp32) parameters.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_registrations: list[torch.library.Library] = []  # keep the libraries (and their kernels) alive


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype an op sees for an input of `dtype` on `device_type` under the current autocast state."""
    if (dtype.is_floating_point and dtype != torch.float64 and device_type in _AUTOCAST_KEYS
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != torch.float64 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def autocast_inputs(device_type: str, *values):
    """`values` (tensors or lists of tensors) cast to the autocast dtype of `device_type`, or
    unchanged when autocast is off there."""
    if device_type not in _AUTOCAST_KEYS or not torch.is_autocast_enabled(device_type):
        return values
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(_cast(v, dtype) for v in values)


def register_autocast(op, qualname: str, cast_args: Sequence[int]) -> None:
    """Autocast kernels (CPU and CUDA) for the custom op `op` ("namespace::name"): positional
    arguments at `cast_args` are cast to the current autocast dtype, then the op runs with
    autocast off. Unlike torch.library.register_autocast, the dtype follows the autocast
    context (bfloat16 or float16) instead of being fixed at registration."""
    namespace, name = qualname.split("::")
    lib = torch.library.Library(namespace, "IMPL")
    for device_type, key in _AUTOCAST_KEYS.items():
        lib.impl(name, _autocast_kernel(op, device_type, tuple(cast_args)), key)
    _registrations.append(lib)


def _autocast_kernel(op, device_type: str, cast_args: tuple[int, ...]) -> Callable:
    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        args = [_cast(a, dtype) if i in cast_args else a for i, a in enumerate(args)]
        with torch.autocast(device_type, enabled=False):
            return op(*args)
    return kernel

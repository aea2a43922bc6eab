"""Packed variable-length batches: cu_seqlens whose bounds the host already knows.

Checking a cu_seqlens tensor that lives on a GPU costs a device sync. Whoever builds a packed
batch knows its lengths on the host: `cu_seqlens_from_lengths` records them on the tensor it
returns, and `tubevit_fast.attention` trusts that record instead of reading the tensor back, as
long as the tensor has not been modified since (its version counter is unchanged). A TubeViT
forward thus validates its packed batch once, where it is built, not once per layer.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch

_ATTR = "_tubevit_fast_bounds"


def cu_seqlens_from_lengths(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """int32 (len(lengths) + 1,) offsets [0, l0, l0 + l1, ...] on `device`, with the bounds recorded."""
    lengths = list(lengths)
    bounds = [0]
    for n in lengths:
        try:
            n = operator.index(n)
        except TypeError:
            raise TypeError(f"sequence lengths must be integers, got {lengths}") from None
        if n < 0:
            raise ValueError(f"sequence lengths must be >= 0, got {lengths}")
        bounds.append(bounds[-1] + n)
    # Made on the CPU whatever torch.set_default_device says, then moved.
    cu = torch.tensor(bounds, dtype=torch.int32, device="cpu").to(device if device is not None else "cpu")
    if not torch.compiler.is_compiling():  # traced code checks nothing on the host anyway
        # An inference tensor has no version counter (and cannot change outside inference_mode):
        # its record is trusted as it is.
        setattr(cu, _ATTR, (None if cu.is_inference() else cu._version, tuple(bounds)))
    return cu


def known_bounds(cu: torch.Tensor) -> tuple[int, ...] | None:
    """The bounds recorded by cu_seqlens_from_lengths, or None (none recorded, or the tensor changed)."""
    record = getattr(cu, _ATTR, None)
    if record is None or (not cu.is_inference() and record[0] != cu._version):
        return None
    return record[1]

"""Tube geometry: the one home of grids, centres, footprints and token offsets.

A tube is a strided 3D patch sampler (a Conv3d with kernel k, stride s, applied to the
video cropped at offset o, no padding). Everything that needs to know where a tube reads
or where its tokens land (the reference tokenizer, the kernels' launchers, the position
embedding, the audit and the benchmarks' byte counts) asks this module.

Axis order is always (t, h, w).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

Triple = tuple[int, int, int]


def _triple(name: str, value, minimum: int) -> Triple:
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"TubeSpec.{name} must be three ints (t, h, w), got {value!r}") from None
    if len(items) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
        raise TypeError(f"TubeSpec.{name} must be three ints (t, h, w), got {value!r}")
    items = tuple(int(v) for v in items)
    if any(v < minimum for v in items):
        raise ValueError(f"TubeSpec.{name} entries must be >= {minimum}, got {items}")
    return items


_AXIS_NAMES = {"t": 0, "h": 1, "w": 2}


def _space_to_depth(value) -> tuple[int, int] | None:
    """None, or (axis, factor) with axis 0/1/2 (or "t"/"h"/"w") and an int factor >= 2."""
    if value is None:
        return None
    try:
        axis, factor = value
    except (TypeError, ValueError):
        raise TypeError(f"TubeSpec.space_to_depth must be None or (axis, factor), got {value!r}") from None
    axis = _AXIS_NAMES.get(axis, axis) if isinstance(axis, str) else axis
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or axis not in (0, 1, 2):
        raise ValueError(f"TubeSpec.space_to_depth: axis must be 0/1/2 or 't'/'h'/'w', got {value[0]!r}")
    if not isinstance(factor, (int, np.integer)) or isinstance(factor, bool) or factor < 2:
        raise ValueError(f"TubeSpec.space_to_depth: factor must be an int >= 2, got {factor!r}")
    return int(axis), int(factor)


@dataclass(frozen=True)
class TubeSpec:
    """One tube: Conv3d(kernel, stride) over the video cropped at `offset`.

    space_to_depth: None, or (axis, factor) (the paper's space-to-depth): the sampler's tokens
    are grouped `factor` at a time along `axis` (0/1/2 = t/h/w) and each group becomes ONE
    token, the group's per-token projections (dim / factor channels each) concatenated along
    channels, the one nearer the grid origin first. A leftover partial group is dropped. The
    merged token sits at the group's mean centre. `sampler_grid` is the grid the kernel is
    applied on, `grid` the grid of the tokens that come out.
    """

    kernel: Triple
    stride: Triple
    offset: Triple = (0, 0, 0)
    space_to_depth: tuple[int, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "kernel", _triple("kernel", self.kernel, 1))
        object.__setattr__(self, "stride", _triple("stride", self.stride, 1))
        object.__setattr__(self, "offset", _triple("offset", self.offset, 0))
        object.__setattr__(self, "space_to_depth", _space_to_depth(self.space_to_depth))

    @property
    def factors(self) -> Triple:
        """Tokens merged per output token along (t, h, w): all 1 without space-to-depth."""
        factors = [1, 1, 1]
        if self.space_to_depth is not None:
            axis, factor = self.space_to_depth
            factors[axis] = factor
        return tuple(factors)

    @property
    def merge(self) -> int:
        """Sampler tokens per output token (space-to-depth factor, or 1)."""
        return math.prod(self.factors)

    @property
    def is_2d(self) -> bool:
        """A tube that reads a single frame: the one images go through."""
        return self.kernel[0] == 1 and self.factors[0] == 1

    def patch_size(self, in_channels: int) -> int:
        """Length of one flattened patch, C * kt * kh * kw (the GEMM's K)."""
        kt, kh, kw = self.kernel
        return in_channels * kt * kh * kw

    def width(self, dim: int) -> int:
        """Channels one sampler token is projected to: dim / (space-to-depth factor)."""
        if dim % self.merge:
            raise ValueError(f"{self}: dim {dim} is not divisible by the space-to-depth factor {self.merge}")
        return dim // self.merge

    def token_dim(self, width: int) -> int:
        """Channels of an output token when each sampler token is projected to `width`."""
        return width * self.merge

    def sampler_grid(self, size: Sequence[int]) -> Triple:
        """Positions the kernel is applied at per axis: floor((L - offset - kernel) / stride) + 1
        (0 if it does not fit), cut to whole space-to-depth groups."""
        size = _size(size)
        return tuple(
            ((length - o - k) // s + 1) // f * f if length >= o + k else 0
            for length, k, s, o, f in zip(size, self.kernel, self.stride, self.offset, self.factors)
        )

    def grid(self, size: Sequence[int]) -> Triple:
        """Output tokens per axis (the sampler grid divided by the space-to-depth factors)."""
        return tuple(n // f for n, f in zip(self.sampler_grid(size), self.factors))

    def fits(self, size: Sequence[int]) -> bool:
        return all(n > 0 for n in self.grid(size))

    def min_size(self) -> Triple:
        """The smallest (T, H, W) this tube yields a token on: offset + one group's span."""
        return tuple(o + k + (f - 1) * s for k, s, o, f in zip(self.kernel, self.stride, self.offset, self.factors))

    def num_tokens(self, size: Sequence[int]) -> int:
        return math.prod(self.grid(size))

    def centres(self, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-axis token centres in input pixels, float64: o + i * s + (k - 1) / 2 for a
        sampler token; the mean over its group, o + i * f * s + ((f - 1) * s + k - 1) / 2, for a
        merged one."""
        return tuple(
            o + np.arange(n, dtype=np.float64) * (f * s) + ((f - 1) * s + k - 1) / 2.0
            for n, k, s, o, f in zip(self.grid(size), self.kernel, self.stride, self.offset, self.factors)
        )

    def footprint(self, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sorted indices of the frames, rows and columns this tube reads (empty if it does not fit)."""
        grid = self.sampler_grid(size)
        if not all(grid):
            return tuple(np.zeros(0, dtype=np.int64) for _ in range(3))
        return tuple(
            np.unique((o + np.arange(n)[:, None] * s + np.arange(k)[None, :]).ravel())
            for n, k, s, o in zip(grid, self.kernel, self.stride, self.offset)
        )

    def sampler_offsets(self, size: Sequence[int], strides: Sequence[int]) -> np.ndarray:
        """(N_s,) int64: where each sampler token's patch starts in a video with (t, h, w) element
        strides `strides`, i.e. sum over axes of (o + i * s) * stride, tokens row-major over the
        sampler grid. Gathers add patch_offsets to it."""
        axes = [(o + np.arange(n, dtype=np.int64) * s) * stride
                for n, s, o, stride in zip(self.sampler_grid(size), self.stride, self.offset, strides)]
        return (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]).ravel()

    def patch_offsets(self, in_channels: int, strides: Sequence[int]) -> np.ndarray:
        """(K,) int64: each patch element's offset from its token's first pixel in a video with
        (c, t, h, w) element strides `strides`, in W.reshape(dim, -1)'s (c, dt, dh, dw) order."""
        axes = [np.arange(n, dtype=np.int64) * stride for n, stride in zip((in_channels, *self.kernel), strides)]
        return (axes[0][:, None, None, None] + axes[1][None, :, None, None] + axes[2][None, None, :, None]
                + axes[3][None, None, None, :]).ravel()

    def sampler_slots(self, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(output token, member) of each sampler token, row-major over the sampler grid: member j of
        a space-to-depth group fills channels j * width ... (j + 1) * width of its output token, j
        counting the group's sampler tokens row-major. Without space-to-depth: (arange, zeros)."""
        (nt, nh, nw), (ft, fh, fw) = self.sampler_grid(size), self.factors
        it, ih, iw = np.meshgrid(np.arange(nt), np.arange(nh), np.arange(nw), indexing="ij")
        token = ((it // ft) * (nh // fh) + ih // fh) * (nw // fw) + iw // fw
        member = ((it % ft) * fh + ih % fh) * fw + iw % fw
        return token.ravel().astype(np.int64), member.ravel().astype(np.int64)

    def overlaps_itself(self) -> bool:
        """True when neighbouring tokens read shared pixels (stride < kernel on some axis)."""
        return any(s < k for k, s in zip(self.kernel, self.stride))

    def as_image_tube(self) -> "TubeSpec":
        """The tube as used on a single image: temporal offset ignored."""
        if not self.is_2d:
            raise ValueError(f"{self} reads more than one frame and cannot read an image")
        return TubeSpec(self.kernel, self.stride, (0, self.offset[1], self.offset[2]), self.space_to_depth)

    def __str__(self) -> str:
        s2d = "" if self.space_to_depth is None else f", space_to_depth={self.space_to_depth}"
        return f"TubeSpec(kernel={self.kernel}, stride={self.stride}, offset={self.offset}{s2d})"


# The four tubes of the paper's main results (shared/TUBEVIT.md), in that order.
PAPER_TUBES: tuple[TubeSpec, ...] = (
    TubeSpec(kernel=(8, 8, 8), stride=(16, 32, 32), offset=(0, 0, 0)),
    TubeSpec(kernel=(16, 4, 4), stride=(6, 32, 32), offset=(4, 8, 8)),
    TubeSpec(kernel=(4, 12, 12), stride=(16, 32, 32), offset=(0, 16, 16)),
    TubeSpec(kernel=(1, 16, 16), stride=(32, 16, 16), offset=(0, 0, 0)),
)


def _size(size: Sequence[int]) -> Triple:
    items = tuple(size)
    # Symbolic ints (torch.compile's dynamic shapes) pass through untouched.
    if len(items) != 3 or any(isinstance(v, (float, bool)) for v in items):
        raise TypeError(f"input size must be three ints (T, H, W), got {size!r}")
    return items


def as_tubes(tubes: Iterable[TubeSpec]) -> tuple[TubeSpec, ...]:
    """Validate a tube list: non-empty, TubeSpec items only."""
    if isinstance(tubes, TubeSpec):
        tubes = (tubes,)
    tubes = tuple(tubes)
    if not tubes:
        raise ValueError("the tube list is empty: give at least one TubeSpec")
    for i, tube in enumerate(tubes):
        if not isinstance(tube, TubeSpec):
            raise TypeError(f"tube {i} must be a TubeSpec, got {type(tube).__name__}: {tube!r}")
    return tubes


def image_tubes(tubes: Sequence[TubeSpec]) -> tuple[TubeSpec, ...]:
    """The tubes an image goes through: those with kt == 1, temporal offset dropped."""
    picked = tuple(t.as_image_tube() for t in as_tubes(tubes) if t.is_2d)
    if not picked:
        raise ValueError(f"none of the tubes has a temporal kernel of 1, so images cannot be embedded: {list(map(str, tubes))}")
    return picked


def check_fits(tubes: Sequence[TubeSpec], size: Sequence[int]) -> None:
    """Raise ValueError naming the first tube that does not fit in an input of `size`."""
    size = _size(size)
    for i, tube in enumerate(as_tubes(tubes)):
        if not tube.fits(size):
            need = tube.min_size()
            raise ValueError(
                f"input of size (T, H, W) = {size} is too small for tube {i} ({tube}): "
                f"it needs at least {need}"
            )


def token_offsets(tubes: Sequence[TubeSpec], size: Sequence[int]) -> list[int]:
    """Where each tube's tokens start in the concatenated sequence, plus the total at the end."""
    starts = [0]
    for tube in as_tubes(tubes):
        starts.append(starts[-1] + tube.num_tokens(size))
    return starts


def num_tokens(tubes: Sequence[TubeSpec], size: Sequence[int]) -> int:
    return token_offsets(tubes, size)[-1]


def token_centres(tubes: Sequence[TubeSpec], size: Sequence[int]) -> np.ndarray:
    """(N, 3) float64 centres (t, h, w) of every token, in sequence order."""
    rows = []
    for tube in as_tubes(tubes):
        ct, ch, cw = tube.centres(size)
        grid = np.stack(np.meshgrid(ct, ch, cw, indexing="ij"), axis=-1)
        rows.append(grid.reshape(-1, 3))
    return np.concatenate(rows, axis=0)


def read_mask(tubes: Sequence[TubeSpec], size: Sequence[int]) -> np.ndarray:
    """Boolean (T, H, W) mask of the pixels at least one tube reads."""
    size = _size(size)
    mask = np.zeros(size, dtype=bool)
    for tube in as_tubes(tubes):
        per_axis = []
        for read, length in zip(tube.footprint(size), size):
            hit = np.zeros(length, dtype=bool)
            hit[read] = True
            per_axis.append(hit)
        mask |= per_axis[0][:, None, None] & per_axis[1][None, :, None] & per_axis[2][None, None, :]
    return mask


def spread_to_pixels(tubes: Sequence[TubeSpec], size: Sequence[int], values) -> np.ndarray:
    """(T, H, W) float64: at each pixel, the sum of `values` (one per token, in sequence order)
    over the tokens that read that pixel; a space-to-depth token reads its whole group's patches.
    E.g. attention weights over the tokens drawn back onto the video."""
    size, tubes = _size(size), as_tubes(tubes)
    values = np.asarray(values, dtype=np.float64)
    starts = token_offsets(tubes, size)
    if values.shape != (starts[-1],):
        raise ValueError(f"spread_to_pixels needs one value per token ({starts[-1]}), got shape "
                         f"{values.shape}")
    total = np.zeros(size)
    for tube, start, stop in zip(tubes, starts, starts[1:]):
        if start == stop:
            continue
        grid = tube.sampler_grid(size)
        token, _ = tube.sampler_slots(size)
        # Each sampler token's value at its patch's first pixel, then a box sum of the kernel's
        # length along each axis (a difference of cumulative sums) spreads it over the patch.
        spread = np.zeros(size)
        firsts = [o + np.arange(n) * s for n, s, o in zip(grid, tube.stride, tube.offset)]
        spread[np.ix_(*firsts)] = values[start:stop][token].reshape(grid)
        for axis, k in enumerate(tube.kernel):
            sums = np.moveaxis(np.cumsum(spread, axis=axis), axis, 0)
            box = sums.copy()
            box[k:] -= sums[:-k]
            spread = np.moveaxis(box, 0, axis)
        total += spread
    return total


def pixel_fraction(tubes: Sequence[TubeSpec], size: Sequence[int]) -> float:
    """Fraction of the video's pixels that any tube reads (the sparsity a gather exploits)."""
    return float(read_mask(tubes, size).mean())


_PACKED = 12  # ints per packed tube: kernel, stride, offset, space-to-depth factors (t, h, w)


def pack_tubes(tubes: Sequence[TubeSpec]) -> list[int]:
    """Flatten tubes to 12 ints each (kernel, stride, offset, factors): the form custom ops take."""
    return [v for tube in as_tubes(tubes) for v in (*tube.kernel, *tube.stride, *tube.offset, *tube.factors)]


def unpack_tubes(packed: Sequence[int]) -> tuple[TubeSpec, ...]:
    packed = list(packed)
    if len(packed) % _PACKED:
        raise ValueError(f"packed tube list must hold {_PACKED} ints per tube, got {len(packed)}")
    tubes = []
    for i in range(0, len(packed), _PACKED):
        merged = [(axis, f) for axis, f in enumerate(packed[i + 9:i + 12]) if f != 1]
        if len(merged) > 1:
            raise ValueError(f"packed tube {i // _PACKED} merges along more than one axis: {packed[i + 9:i + 12]}")
        tubes.append(TubeSpec(tuple(packed[i:i + 3]), tuple(packed[i + 3:i + 6]), tuple(packed[i + 6:i + 9]),
                              merged[0] if merged else None))
    return tuple(tubes)

"""Which frames of a video make a clip: the one definition training, evaluation and prediction use.

    sampling = ClipSampling(frames=8, stride=2)              # or mode="segments"
    sampling.train_indices(num_frames, item_rng(seed, epoch, index))   # one random clip
    sampling.eval_indices(num_frames, clips=4)               # 4 evenly spaced clips

Modes, for a video of n frames and a clip of f frames:
  "window"    f frames `stride` apart, spanning s = (f - 1) * stride + 1 frames.
              Training: start uniform in [0, max(n - s, 0)].
              Evaluation, clip k of K: start = floor((k + 1/2) * (max(n - s, 0) + 1) / K), the centres
              of K equal parts of the possible starts (mmaction2's test-mode offsets).
  "segments"  the video cut into f equal segments, segment i = [floor(i n / f), floor((i + 1) n / f)).
              Training: one uniformly random frame in each (TSN / SSv2 style; an empty segment, when
              n < f, gives its start). Evaluation, clip k of K: frame floor((i + (k + 1/2) / K) n / f)
              of segment i (K = 1: the segment centres).
Indices past the last frame are clamped to it: a clip shorter than the window repeats its last frame,
as PySlowFast and mmaction2 do, rather than failing.

Training randomness comes from `item_rng(seed, epoch, index)` alone, so an item is the same
whenever (and in whichever worker) it is made: a resumed run sees bitwise the same clips.
The sampling is stored in checkpoints as `to_dict()`; `from_dict` reads it back.
"""
from __future__ import annotations

import dataclasses

import numpy as np

MODES = ("window", "segments")


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one training item: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def torch_seed(*key: int) -> int:
    """A torch.manual_seed value that is a pure function of the integers `key`."""
    return int(np.random.default_rng([int(k) for k in key]).integers(2 ** 63))


@dataclasses.dataclass(frozen=True)
class ClipSampling:
    frames: int
    stride: int = 1
    mode: str = "window"

    def __post_init__(self):
        if not isinstance(self.frames, int) or self.frames < 1:
            raise ValueError(f"frames must be an integer >= 1, got {self.frames!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {self.stride!r}")
        if self.mode not in MODES:
            raise ValueError(f"sampling mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "segments" and self.stride != 1:
            raise ValueError(f"segments sampling takes no stride (got stride {self.stride})")

    @property
    def span(self) -> int:
        """Frames a window covers, first to last."""
        return (self.frames - 1) * self.stride + 1

    def _clamp(self, indices, num_frames: int) -> list[int]:
        return [min(int(i), num_frames - 1) for i in indices]

    def _check(self, num_frames: int) -> None:
        if num_frames < 1:
            raise ValueError(f"a video needs at least 1 frame to sample from, got {num_frames}")

    def train_indices(self, num_frames: int, rng: np.random.Generator) -> list[int]:
        """One random clip's frame indices (see the module docstring)."""
        self._check(num_frames)
        f, n = self.frames, num_frames
        if self.mode == "window":
            start = int(rng.integers(0, max(n - self.span, 0) + 1))
            return self._clamp((start + i * self.stride for i in range(f)), n)
        lows = [i * n // f for i in range(f + 1)]
        return self._clamp((int(rng.integers(lo, max(hi, lo + 1))) for lo, hi in zip(lows, lows[1:])), n)

    def eval_indices(self, num_frames: int, clips: int = 1) -> list[list[int]]:
        """`clips` evenly spaced clips' frame indices (see the module docstring)."""
        self._check(num_frames)
        if not isinstance(clips, int) or clips < 1:
            raise ValueError(f"clips must be an integer >= 1, got {clips!r}")
        f, n = self.frames, num_frames
        if self.mode == "window":
            starts = max(n - self.span, 0) + 1
            return [self._clamp(((2 * k + 1) * starts // (2 * clips) + i * self.stride for i in range(f)), n)
                    for k in range(clips)]
        # frame floor((i + (k + 1/2) / K) * n / f) = floor((2 (i K + k) + 1) n / (2 K f)), exactly in integers
        return [self._clamp(((2 * (i * clips + k) + 1) * n // (2 * clips * f) for i in range(f)), n)
                for k in range(clips)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClipSampling:
        if not isinstance(d, dict) or "frames" not in d:
            raise ValueError(f"a clip sampling needs at least 'frames', got {d!r}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown clip sampling fields {sorted(unknown)}")
        return cls(**d)

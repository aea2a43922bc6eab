"""Multi-view evaluation: a video's score is the mean of its views' softmax (the PySlowFast /
mmaction2 test protocol), and the meter that owns that averaging.

    result = evaluate(model, EvalViews(...), batch_size=8, device="cuda", precision="bf16", workers=4)
    result.top1, result.top5, result.mean_class_accuracy, result.confusion, result.records(paths, classes)

Each dataset item holds all V = clips x crops views of one video, (V, C, T, H, W) uint8; a batch of B
videos goes through the model as one list of B*V views and the meter turns the B*V rows of logits
back into B video scores. Under torch.distributed each rank scores its own shard of the videos
(`shard`: every video exactly once, no padding duplicates as DistributedSampler adds) and rank 0
gathers the scores; the other ranks get None.

Metrics, over the N videos scored:
  top-1 / top-5   the label is the best / among the min(5, classes) best of the averaged scores
  mean class acc  the mean over classes that have at least one video of that class's top-1 accuracy
  confusion       (classes, classes) counts, row = true class, column = predicted class

Also here: `write_report` (the files `python -m tubevit_fast.evaluate --out` writes, REPORT_FILES).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch

PRECISIONS = ("fp32", "bf16")
TOP_K = 5


def shard(num_items: int, rank: int, world_size: int) -> range:
    """The items rank `rank` of `world_size` scores: every world_size-th one from `rank`. The shards
    cover range(num_items) exactly once; a rank may get one item fewer (or none), never a repeat."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return range(rank, num_items, world_size)


@dataclasses.dataclass
class EvalResult:
    """What an evaluation found; `scores` row i is the averaged softmax of video `indices[i]`."""
    indices: np.ndarray          # (N,) dataset indices, ascending
    labels: np.ndarray           # (N,) true labels
    scores: np.ndarray           # (N, classes) float64, each row sums to 1
    skipped: int = 0             # videos that could not be decoded (--bad-files skip)

    @property
    def num_videos(self) -> int:
        return len(self.indices)

    @property
    def num_classes(self) -> int:
        return self.scores.shape[1]

    @property
    def predictions(self) -> np.ndarray:
        return self.scores.argmax(1)

    def topk_accuracy(self, k: int) -> float:
        """Share of videos whose label is among their min(k, classes) best scores (nan: no video)."""
        if not self.num_videos:
            return math.nan
        k = min(k, self.num_classes)
        best = np.argsort(-self.scores, axis=1, kind="stable")[:, :k]
        return float((best == self.labels[:, None]).any(1).mean())

    @property
    def top1(self) -> float:
        return self.topk_accuracy(1)

    @property
    def top5(self) -> float:
        return self.topk_accuracy(TOP_K)

    @property
    def confusion(self) -> np.ndarray:
        """int64 (classes, classes): row = true class, column = predicted class."""
        matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        np.add.at(matrix, (self.labels, self.predictions), 1)
        return matrix

    @property
    def per_class_accuracy(self) -> list[float | None]:
        """Top-1 accuracy of each class's videos; None for a class without videos."""
        matrix = self.confusion
        counts = matrix.sum(1)
        return [float(matrix[c, c] / n) if n else None for c, n in enumerate(counts)]

    @property
    def mean_class_accuracy(self) -> float:
        present = [a for a in self.per_class_accuracy if a is not None]
        return float(np.mean(present)) if present else math.nan

    def summary(self) -> dict:
        return {"videos": self.num_videos, "skipped": self.skipped, "top1": self.top1,
                "top5": self.top5, "top5_k": min(TOP_K, self.num_classes),
                "mean_class_accuracy": self.mean_class_accuracy}

    def records(self, paths: Sequence[str] | None = None, classes: Sequence[str] | None = None):
        """One dict per video (the per-video scores file): index, path, label, prediction, the
        top-5 (class, probability) pairs and every class's probability."""
        classes = list(classes) if classes is not None else [str(c) for c in range(self.num_classes)]
        k = min(TOP_K, self.num_classes)
        for index, label, row in zip(self.indices.tolist(), self.labels.tolist(), self.scores):
            best = np.argsort(-row, kind="stable")[:k].tolist()
            yield {"index": index, "path": paths[index] if paths is not None else None,
                   "label": classes[label], "prediction": classes[best[0]], "correct": best[0] == label,
                   "top5": [[classes[c], float(row[c])] for c in best], "scores": row.tolist()}


class MultiViewMeter:
    """Collects per-view logits and keeps one score per video: the mean of its views' softmax,
    accumulated in float64. A video added twice is an error (each video is scored once)."""

    def __init__(self):
        self._scores: dict[int, np.ndarray] = {}
        self._labels: dict[int, int] = {}
        self.skipped = 0

    def add(self, logits: torch.Tensor, views: Sequence[int], labels: Sequence[int],
            indices: Sequence[int]) -> np.ndarray:
        """logits (sum(views), classes): the rows of video j are the next views[j] rows. Returns
        the videos' scores, float64 (len(views), classes)."""
        views, labels, indices = list(views), [int(x) for x in labels], [int(x) for x in indices]
        if not len(views) == len(labels) == len(indices) or sum(views) != logits.shape[0] or min(views, default=1) < 1:
            raise ValueError(f"{logits.shape[0]} rows of logits do not split into {views} views of "
                             f"{len(labels)} videos")
        probs = logits.detach().double().softmax(-1).cpu().numpy()
        scores = np.stack([rows.mean(0) for rows in np.split(probs, np.cumsum(views)[:-1])])
        for row, label, index in zip(scores, labels, indices):
            if index in self._scores:
                raise ValueError(f"video {index} was scored twice")
            self._scores[index], self._labels[index] = row, label
        return scores

    @property
    def num_videos(self) -> int:
        return len(self._scores)

    def merge(self, other: "MultiViewMeter") -> "MultiViewMeter":
        """Fold in another rank's meter (its videos must be new to this one)."""
        twice = self._scores.keys() & other._scores.keys()
        if twice:
            raise ValueError(f"videos {sorted(twice)[:5]} were scored on two ranks")
        self._scores.update(other._scores)
        self._labels.update(other._labels)
        self.skipped += other.skipped
        return self

    def result(self, num_classes: int) -> EvalResult:
        indices = np.array(sorted(self._scores), dtype=np.int64)
        scores = np.stack([self._scores[i] for i in indices.tolist()]) if len(indices) else np.zeros((0, num_classes))
        if scores.shape[1] != num_classes:
            raise ValueError(f"scores have {scores.shape[1]} classes, expected {num_classes}")
        labels = np.array([self._labels[i] for i in indices.tolist()], dtype=np.int64)
        return EvalResult(indices, labels, scores, self.skipped)


def _world(distributed: bool | None) -> tuple[int, int]:
    import torch.distributed as dist

    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def score_batches(model: torch.nn.Module, loader, device: torch.device, precision: str, meter: MultiViewMeter):
    """For each batch of `loader` (collate_eval batches): the model's logits for all its views in one
    forward pass, folded into `meter`; yields (indices, labels, video scores) per batch, so a caller
    can report as it goes. The model must already be in eval mode."""
    for views, labels, indices in loader:
        if not views:  # every file of the batch skipped as bad
            continue
        flat = [view for video in views for view in video.to(device, non_blocking=True)]  # uint8: the model normalises
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(flat)
        scores = meter.add(logits.float(), [len(v) for v in views], labels.tolist(), indices.tolist())
        yield indices.tolist(), labels.tolist(), scores


def evaluate(model: torch.nn.Module, dataset, batch_size: int, device, precision: str = "fp32", workers: int = 0,
             distributed: bool | None = None) -> EvalResult | None:
    """Score every video of `dataset` (EvalViews items: (uint8 (V, C, T, H, W) views, label, index), or
    None for a file skipped as bad, counted in `skipped`)
    with `model` on `device`, `batch_size` videos per forward pass. precision "bf16": autocast on the
    device (CPU or CUDA). distributed: shard over the process group and gather on rank 0 (None: when
    one is initialised); ranks other than 0 return None. The model is left in the train/eval mode it
    came in."""
    from tubevit_fast.app.datasets import collate_eval
    from tubevit_fast.app.runs import ignore_sigint

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size} and {workers}")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # each rank scores its own videos: no gradient sync, uneven shards are fine
    device = torch.device(device)
    rank, world = _world(distributed)
    mine = torch.utils.data.Subset(dataset, shard(len(dataset), rank, world))
    # Workers ignore Ctrl-C: the main process decides (training's --eval-every finishes, saves, resumes).
    loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate_eval, pin_memory=device.type == "cuda",
                                         worker_init_fn=ignore_sigint if workers else None)
    meter = MultiViewMeter()
    was_training = model.training
    model.eval()
    try:
        for _ in score_batches(model, loader, device, precision, meter):
            pass
    finally:
        model.train(was_training)
    meter.skipped = len(mine) - meter.num_videos  # collate_eval leaves out the files skipped as bad
    if world > 1:
        import torch.distributed as dist

        meters = [None] * world if rank == 0 else None
        dist.gather_object(meter, meters, dst=0)
        if rank != 0:
            return None
        meter = MultiViewMeter()
        for other in meters:
            meter.merge(other)
    return meter.result(model.num_classes)


# ---- report files --------------------------------------------------------------------------------

REPORT_FILES = ("summary.json", "scores.jsonl", "per_class.json", "per_class.csv", "confusion.png")


def confusion_figure_inches(num_classes: int) -> float:
    """Side of the square confusion-matrix figure: grows with the classes, 20 inches at most."""
    return min(20.0, 3.0 + 0.3 * num_classes)


CONFUSION_DPI = 100
LABELLED_CLASSES, ANNOTATED_CLASSES = 40, 20   # class names on the axes / counts in the cells up to this many


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: str) -> str:
    """PNG of the confusion matrix, each row normalised by its class's video count (the colour is the
    share of the true class given to the predicted one); counts written in the cells of small ones."""
    from tubevit_fast.io import require

    require("matplotlib", "drawing the confusion matrix").use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    counts = confusion.sum(1, keepdims=True)
    shares = np.divide(confusion, counts, out=np.zeros(confusion.shape), where=counts > 0)
    side = confusion_figure_inches(k)
    fig, ax = plt.subplots(figsize=(side, side), dpi=CONFUSION_DPI)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= LABELLED_CLASSES:
        ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(k), classes, fontsize=7)
    if k <= ANNOTATED_CLASSES:
        for (row, col), n in np.ndenumerate(confusion):
            if n:
                ax.text(col, row, str(n), ha="center", va="center", fontsize=7,
                        color="white" if shares[row, col] > 0.5 else "black")
    ax.set_title(f"confusion ({int(confusion.sum())} videos)")
    fig.tight_layout()
    fig.savefig(path, dpi=CONFUSION_DPI)
    plt.close(fig)
    return path


def write_report(result: EvalResult, out: str, classes: Sequence[str], paths: Sequence[str],
                 extra: dict | None = None) -> list[str]:
    """REPORT_FILES into `out`: the summary (with `extra`, e.g. the views and the checkpoint), one
    JSON line per video, per-class accuracy as JSON and CSV, the confusion-matrix PNG."""
    import csv
    import json
    import os

    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, name) for name in REPORT_FILES]
    summary_path, scores_path, json_path, csv_path, png_path = written
    with open(scores_path, "w") as f:
        for record in result.records(paths, classes):
            f.write(json.dumps(record) + "\n")
    confusion = result.confusion
    per_class = [{"class": name, "videos": int(confusion[c].sum()), "correct": int(confusion[c, c]),
                  "accuracy": acc} for c, (name, acc) in enumerate(zip(classes, result.per_class_accuracy))]
    with open(json_path, "w") as f:
        json.dump(per_class, f, indent=1)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["class", "videos", "correct", "accuracy"])
        writer.writeheader()
        writer.writerows({**row, "accuracy": "" if row["accuracy"] is None else row["accuracy"]} for row in per_class)
    plot_confusion(confusion, classes, png_path)
    with open(summary_path, "w") as f:  # last: a folder with a summary holds a finished evaluation
        json.dump({**result.summary(), **(extra or {})}, f, indent=1)
    return written

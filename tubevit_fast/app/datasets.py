"""Datasets for training and evaluation: uint8 clips out of the loader, bad files counted, not fatal.

    train = TrainClips(FileMedia(ann), ClipSampling(16, stride=4), train_transform(224), seed=0, short_side=256)
    sampler = StepBatchSampler(len(train), batch_size=8, seed=0, start=step, stop=steps)
    loader = DataLoader(train, batch_sampler=sampler, collate_fn=collate_train, num_workers=4)
    for samples, labels, skipped in loader: ...           # samples: uint8 (C, T, H, W) / (C, H, W)

    views = EvalViews(FileMedia(val), ClipSampling(16, stride=4), size=224, clips=4, crops=3)
    for views, labels, indices in DataLoader(views, batch_size=4, collate_fn=collate_eval): ...

Training items are keyed (index, epoch): the frames (sampling.item_rng) and the augmentation (torch's
generator seeded from the same key) are a pure function of (seed, epoch, index), so a resumed run,
in any number of workers, sees bitwise the same items. Joint image + video training: TrainClips(videos,
images=image_media) puts the images after the videos (keys len(videos)...), and
StepBatchSampler(len(videos), num_images=len(images), image_ratio=r) fills a fraction r of every batch
from them. A file that fails to decode (MediaError, OSError) is skipped with one warning line naming it
(bad_files="skip"; the item is None and collate_train counts it) or raised as a MediaError naming it
(bad_files="error").
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Sequence

import torch
from torchvision import tv_tensors

from tubevit_fast.app.clip_index import BAD_FILES
from tubevit_fast.app.sampling import ClipSampling, item_rng, torch_seed
from tubevit_fast.app.transforms import eval_views
from tubevit_fast.io import MediaError, first_line



def _check_bad_files(bad_files: str) -> None:
    if bad_files not in BAD_FILES:
        raise ValueError(f"bad_files must be one of {BAD_FILES}, got {bad_files!r}")


def _failed(media, index: int, err: Exception, bad_files: str) -> None:
    """Skip (warn, return) or raise for item `index` whose file could not be used."""
    name = media.name(index)
    reason = first_line(err).replace(f"{name}: ", "")
    if bad_files == "error":
        raise MediaError(f"{name}: {reason}") from err
    print(f"warning: skipped {name}: {reason}", file=sys.stderr, flush=True)


def _to_tv(frames: torch.Tensor, image: bool):
    """uint8 (T, H, W, 3) -> tv_tensors.Video (T, C, H, W), or Image (C, H, W) for an image."""
    x = frames.permute(0, 3, 1, 2)
    return tv_tensors.Image(x[0]) if image else tv_tensors.Video(x)


class TrainClips(torch.utils.data.Dataset):
    """Key (index, epoch) -> (uint8 (C, T, H, W) clip or (C, H, W) image, label), or None for a
    skipped file. Indices past len(media) are the `images` media set's items (joint training)."""

    def __init__(self, media, sampling: ClipSampling, transform: Callable | None = None, seed: int = 0,
                 short_side: int | None = None, bad_files: str = "skip", images=None):
        _check_bad_files(bad_files)
        if short_side is not None and short_side < 1:
            raise ValueError(f"short_side must be >= 1 or None, got {short_side}")
        self.media, self.images, self.sampling, self.transform = media, images, sampling, transform
        self.seed, self.short_side, self.bad_files = seed, short_side, bad_files

    def __len__(self) -> int:
        return len(self.media) + (len(self.images) if self.images is not None else 0)

    def _locate(self, index: int):
        if 0 <= index < len(self.media):
            return self.media, index
        if self.images is not None and 0 <= index - len(self.media) < len(self.images):
            return self.images, index - len(self.media)
        raise IndexError(f"item {index} out of range for {len(self)} items")

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        media, i = self._locate(index)
        rng = item_rng(self.seed, epoch, index)
        image = media.is_image(i)
        try:
            indices = [0] if image else self.sampling.train_indices(media.num_frames(i), rng)
            x = _to_tv(media.read(i, indices, self.short_side), image)
        except (MediaError, OSError) as err:
            _failed(media, i, err, self.bad_files)
            return None
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2 ** 63)))  # the item's draw, whatever the worker
                x = self.transform(x)
        x = x.as_subclass(torch.Tensor)
        return (x if image else x.transpose(0, 1)).contiguous(), media.label(i)


class EvalViews(torch.utils.data.Dataset):
    """Item i -> (uint8 (V, C, T, H, W) views, label, i), V = clips x crops in that order (clip-major);
    an image gives (crops, C, H, W). None for a skipped file (bad_files="skip")."""

    def __init__(self, media, sampling: ClipSampling, size: int, clips: int = 1, crops: int = 1,
                 short_side: int | None = None, bad_files: str = "error"):
        _check_bad_files(bad_files)
        if not isinstance(clips, int) or clips < 1:
            raise ValueError(f"clips must be an integer >= 1, got {clips!r}")
        self.media, self.sampling, self.clips, self.crops = media, sampling, clips, crops
        self.views = eval_views(size, crops)
        self.short_side = size if short_side is None else short_side
        self.bad_files = bad_files

    def __len__(self) -> int:
        return len(self.media)

    def __getitem__(self, index: int):
        media = self.media
        if not 0 <= index < len(media):
            raise IndexError(f"item {index} out of range for {len(media)} items")
        image = media.is_image(index)
        try:
            if image:
                clips = [_to_tv(media.read(index, [0], self.short_side), True)]
            else:
                wanted = self.sampling.eval_indices(media.num_frames(index), self.clips)
                frames = media.read(index, [i for clip in wanted for i in clip], self.short_side)
                clips = [_to_tv(part, False) for part in frames.split(self.sampling.frames)]
        except (MediaError, OSError) as err:
            _failed(media, index, err, self.bad_files)
            return None
        views = [v.as_subclass(torch.Tensor) for clip in clips for v in self.views(clip)]
        views = torch.stack(views if image else [v.transpose(0, 1) for v in views])
        return views.contiguous(), media.label(index), index


def collate_train(batch: Sequence) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """(samples for the model's packed list input, labels, how many items were skipped)."""
    kept = [item for item in batch if item is not None]
    labels = torch.tensor([label for _, label in kept], dtype=torch.long)
    return [x for x, _ in kept], labels, len(batch) - len(kept)


def collate_eval(batch: Sequence) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(views per video, labels, dataset indices); skipped items are left out."""
    kept = [item for item in batch if item is not None]
    return ([views for views, _, _ in kept], torch.tensor([label for _, label, _ in kept], dtype=torch.long),
            torch.tensor([i for _, _, i in kept], dtype=torch.long))


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, epoch) keys for training steps start..stop-1, each rank its own shard.

    Epoch e shuffles all indices with a generator seeded by (seed, e), pads the permutation by
    wrapping to a multiple of world_size (as DistributedSampler does) and gives rank r every
    world_size-th index from r. Batch `step` is the (step % batches_per_epoch)-th slice of
    epoch step // batches_per_epoch: a pure function of the step, so a resumed run sees
    exactly the batches an uninterrupted one would (drop_last within an epoch).

    Joint training (num_images > 0 and image_ratio > 0): the images are items num_items ..
    num_items + num_images - 1, with their own epochs and shuffles; step s takes
    floor((s + 1) b r) - floor(s b r) images (b = batch_size, r = image_ratio: a fraction r of
    the items on average, the same for every run) and the rest videos, each set read as one stream
    of its epochs' shards, so its epochs follow each other without a dropped tail.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0, stop: int = 1, num_images: int = 0, image_ratio: float = 0.0):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, "
                             f"{world_size}")
        if not 0 <= image_ratio <= 1 or (image_ratio > 0 and num_images < 1):
            raise ValueError(f"image_ratio must be in [0, 1] and needs images, got {image_ratio} with "
                             f"{num_images} images")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.start, self.stop = rank, world_size, start, stop
        self.num_images, self.image_ratio = num_images, image_ratio
        self.joint = num_images > 0 and image_ratio > 0
        self.per_rank = math.ceil(num_items / world_size)
        self.batches_per_epoch = self.per_rank // batch_size
        if self.joint:
            if num_items < 1 and image_ratio < 1:
                raise ValueError("joint training with image_ratio < 1 needs at least one video")
        elif self.batches_per_epoch < 1:
            raise ValueError(f"{num_items} items over {world_size} rank(s) is less than one batch of {batch_size}")
        self._shards: dict[tuple[int, int], list[int]] = {}

    def shard(self, epoch: int, images: bool = False) -> list[int]:
        """This rank's indices of `epoch` (of the image set with images=True), in order."""
        cached = self._shards.get((images, epoch))
        if cached is not None:
            return cached
        count = self.num_images if images else self.num_items
        seed = torch_seed(self.seed, epoch, 1) if images else self.seed * 1_000_003 + epoch
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
        per_rank = math.ceil(count / self.world_size)
        total = per_rank * self.world_size
        order = (order * math.ceil(total / count))[:total][self.rank::self.world_size]
        if images:
            order = [self.num_items + i for i in order]
        self._shards = {k: v for k, v in self._shards.items() if k[0] != images}  # keep one epoch per set
        self._shards[(images, epoch)] = order
        return order

    def _stream(self, begin: int, end: int, images: bool) -> list[tuple[int, int]]:
        """Keys begin..end-1 of the set's stream of shards, epoch after epoch."""
        per_rank = math.ceil((self.num_images if images else self.num_items) / self.world_size)
        keys = []
        for position in range(begin, end):
            epoch, offset = divmod(position, per_rank)
            keys.append((self.shard(epoch, images)[offset], epoch))
        return keys

    def images_before(self, step: int) -> int:
        """Images in the batches of steps 0..step-1 (joint training)."""
        return math.floor(step * self.batch_size * self.image_ratio + 1e-9)

    def batch(self, step: int) -> list[tuple[int, int]]:
        if self.joint:
            first, last = self.images_before(step), self.images_before(step + 1)
            videos = self._stream(step * self.batch_size - first, (step + 1) * self.batch_size - last, False)
            return videos + self._stream(first, last, True)
        epoch, b = divmod(step, self.batches_per_epoch)
        order = self.shard(epoch)
        return [(i, epoch) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

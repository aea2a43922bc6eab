"""The clip index: every video's VideoInfo (frame count, frame rate, timestamps, keyframes), probed
once per dataset so that sampling knows a clip's length and workers seek without probing again.

    index = build_clip_index(paths, cache_file="train.clip_index.json")   # {path: VideoInfo}
    media = FileMedia.indexed(annotations, cache_file, bad_files="skip")   # what the command lines use
    frames = read_frames(path, indices, short_side=224, info=index[path])

Probing decodes each file once without converting pixels (decode.probe: headers can be wrong about
the frame count). The cache is a JSON file keyed by absolute path, with each file's size and
modification time: a file whose size or mtime changed is probed again, a missing or damaged cache
file is rebuilt (one warning), and the cache is rewritten only when something was probed. Files that
cannot be decoded raise MediaError, or with bad_files="skip" are left out (one warning) and probed
again next time.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable

from tubevit_fast.app.decode import VideoInfo, available_cores, probe
from tubevit_fast.io import MediaError

CACHE_VERSION = 1
BAD_FILES = ("skip", "error")  # what to do with a file that cannot be decoded, here and in the datasets


def _stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _load_cache(cache_file: str | None) -> dict:
    if cache_file is None or not os.path.exists(cache_file):
        return {}
    try:
        with open(cache_file) as f:
            data = json.load(f)
        if data.get("version") != CACHE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
        return {path: (tuple(entry["stamp"]), VideoInfo.from_dict(entry["info"]))
                for path, entry in data["videos"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(f"clip index cache {cache_file} cannot be read ({err}); rebuilding it", stacklevel=3)
        return {}


def _save_cache(cache_file: str, entries: dict) -> None:
    data = {"version": CACHE_VERSION,
            "videos": {path: {"stamp": list(stamp), "info": info.to_dict()}
                       for path, (stamp, info) in entries.items()}}
    tmp = f"{cache_file}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, cache_file)  # readers never see a half-written cache


def _probe_one(path: str) -> VideoInfo | MediaError:
    try:
        return probe(path, threads=1)
    except MediaError as err:  # returned, not raised: the other files still get indexed
        return err


def default_cache_file() -> str:
    """The clip index cache the command lines share: $XDG_CACHE_HOME (or ~/.cache)/tubevit_fast/
    clip_index.json. One file serves every dataset: entries are keyed by absolute path, size and mtime."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "tubevit_fast", "clip_index.json")


def index_videos(paths: Iterable, cache_file=None, progress: bool = True, workers: int | None = None
                 ) -> tuple[dict[str, VideoInfo], dict[str, MediaError]]:
    """({absolute path: VideoInfo}, {absolute path: MediaError} for the files that cannot be decoded),
    in the order of `paths`; unchanged files come from the cache. workers: processes probing in
    parallel (None: one per core; 0 or 1: probe in this process)."""
    paths = list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in paths))
    cache_file = None if cache_file is None else os.fspath(cache_file)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} video files do not exist, e.g. {missing[0]}")
    cached = _load_cache(cache_file)
    stamps = {p: _stamp(p) for p in paths}
    index = {p: cached[p][1] for p in paths if p in cached and cached[p][0] == stamps[p]}
    todo = [p for p in paths if p not in index]
    failed: dict[str, MediaError] = {}
    if todo:
        workers = available_cores() if workers is None else workers
        with _progress(len(todo), progress) as bar, _mapper(min(workers, len(todo))) as mapper:
            for path, result in zip(todo, mapper(_probe_one, todo)):
                if isinstance(result, MediaError):
                    failed[path] = result
                else:
                    index[path] = result
                bar.update()
    if cache_file is not None and len(failed) < len(todo):
        cached.update({p: (stamps[p], index[p]) for p in todo if p in index})
        _save_cache(cache_file, cached)
    return {p: index[p] for p in paths if p in index}, {p: failed[p] for p in paths if p in failed}


def build_clip_index(paths: Iterable, cache_file=None, progress: bool = True, workers: int | None = None,
                     bad_files: str = "error") -> dict[str, VideoInfo]:
    """{absolute path: VideoInfo} for `paths`, from the cache where the file is unchanged (index_videos).

    bad_files: "error" (MediaError naming the first file that cannot be decoded and how many
    cannot) or "skip" (left out of the index, one warning naming the first and how many)."""
    if bad_files not in BAD_FILES:
        raise ValueError(f"bad_files must be one of {BAD_FILES}, got {bad_files!r}")
    paths = list(paths)
    index, failed = index_videos(paths, cache_file, progress, workers)
    if failed:
        first, total = next(iter(failed.values())), len(index) + len(failed)
        if bad_files == "error":
            raise MediaError(f"{len(failed)} of {total} videos cannot be decoded, e.g. {first}")
        warnings.warn(f"clip index: skipping {len(failed)} of {total} videos that cannot be decoded, "
                      f"e.g. {first}", stacklevel=2)
    return index


@contextlib.contextmanager
def _mapper(workers: int):
    """map() over `workers` processes (in this process for 0 or 1)."""
    if workers <= 1:
        yield map
        return
    with ProcessPoolExecutor(workers) as pool:
        yield functools.partial(pool.map, chunksize=4)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="indexing videos", unit="video", disable=not enabled)

"""Checkpoints of tubevit_fast.train: what they hold, how a model is rebuilt from one.

A checkpoint is a dict saved with torch.save and read with torch.load(weights_only=True):
    model         the model's state_dict
    ema           the EMA weights' state_dict (only with --ema)
    frozen        names of the parameters that do not train (--scale-from)
    model_config  what build_model needs: num_classes, classes, tubes, dim, depth, heads, mlp_ratio,
                  frames, size, mean, std (and qkv_bias, interpolated_from, gate_layer + source_dim
                  for models made by --init / --scale-from)
    sampling      ClipSampling.to_dict(): how clips were sampled (evaluate and predict default to it,
                  checkpoint_sampling)
    args          the train command's options (vars(args)); --resume takes its defaults from them
    step, optimizer, scheduler, rng: what resuming needs
"""
from __future__ import annotations

import hashlib
import os

import torch

from tubevit_fast.cli import UsageError, one_line
from tubevit_fast.data import SMALL_TUBES
from tubevit_fast.geometry import PAPER_TUBES, check_fits

TUBE_SETS = {"small": SMALL_TUBES, "paper": PAPER_TUBES}
BACKEND_CHOICES = ("auto", "reference", "torch", "triton")
CHECKPOINT = "last.pt"
REQUIRED = ("model", "model_config", "step", "args")


def build_model(cfg: dict, backend: str = "auto", **kwargs) -> torch.nn.Module:
    """TubeViT from a checkpoint's model config (see the module docstring). backend "reference" gives
    the eager reference model; the others the fast one (same state_dict either way). kwargs go to
    the model (e.g. drop_path)."""
    tubes = TUBE_SETS[cfg["tubes"]]
    kwargs = dict(num_classes=cfg["num_classes"], tubes=tubes, dim=cfg["dim"], depth=cfg["depth"],
                  heads=cfg["heads"], mlp_ratio=cfg.get("mlp_ratio", 4.0), qkv_bias=cfg.get("qkv_bias", True),
                  pixel_mean=cfg.get("mean"), pixel_std=cfg.get("std"), **kwargs)
    if cfg.get("interpolated_from"):
        kwargs["interpolated_from"] = tuple(cfg["interpolated_from"])
    if cfg.get("gate_layer"):
        from tubevit_fast.convert import GatedTubeViT, ProjectedTubeEmbed

        model = GatedTubeViT(**kwargs, gate_layer=cfg["gate_layer"], backend=backend)
        projected = [i for i, t in enumerate(tubes) if not t.is_2d]
        model.tube_embed = ProjectedTubeEmbed(tubes, 3, cfg["dim"], cfg["source_dim"], projected, backend=backend)
        return model
    if backend == "reference":
        from tubevit_fast.reference.model import TubeViT as ReferenceTubeViT

        return ReferenceTubeViT(**kwargs)
    from tubevit_fast.model import TubeViT

    return TubeViT(**kwargs, backend=backend)


def check_input_size(tubes: str, frames: int, size: int) -> None:
    """UsageError when a --frames x --size x --size clip is too small for a tube of the set."""
    try:
        check_fits(TUBE_SETS[tubes], (frames, size, size))
    except ValueError as err:
        raise UsageError(f"--frames {frames} --size {size}: {one_line(err)}") from None


def read_checkpoint(path, map_location="cpu") -> dict:
    """A train.py checkpoint as a dict, loaded with torch.load(weights_only=True): tensors and
    plain Python values only, so a file cannot run code. UsageError (a ValueError) for a missing
    file or one that is not such a checkpoint."""
    ckpt = read_weights_file(path, map_location)
    if not isinstance(ckpt, dict) or not set(REQUIRED) <= ckpt.keys():
        hint = (" (daniel-code/TubeViT weights load with tubevit_fast.convert.from_tubevit_port)"
                if isinstance(ckpt, dict) and any("sparse_tubes_tokenizer" in str(k) for k in ckpt) else "")
        raise UsageError(f"{path}: not a tubevit_fast.train checkpoint (needs {sorted(REQUIRED)}){hint}")
    return ckpt


def read_weights_file(path, map_location="cpu"):
    """Whatever torch.load(weights_only=True) reads from `path`; UsageError for a missing or
    unreadable file, or one holding pickled Python objects."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt file, not a torch file, or pickled objects
        message = str(err)
        if "Unsupported global" in message:
            raise UsageError(f"{path}: holds pickled Python objects, not only tensors (a checkpoint of an older "
                             f"tubevit_fast, or not one of ours); if you trust the file, load it with "
                             f"torch.load(path, weights_only=False)") from None
        if "WeightsUnpickler error:" in message:  # torch.load's long explanation: keep its reason only
            tail = message.split("WeightsUnpickler error:", 1)[1]
            message = next((line.strip() for line in tail.splitlines() if line.strip()), "unreadable")
        raise UsageError(f"{path}: not a PyTorch checkpoint file ({one_line(RuntimeError(message))})") from None


def checkpoint_weights(ckpt: dict, ema: bool = False, path=None) -> dict:
    """The state_dict to score: the raw weights, or with ema=True the EMA weights (UsageError when the
    run kept none)."""
    if not ema:
        return ckpt["model"]
    if "ema" not in ckpt:
        raise UsageError(f"--ema: {path or 'the checkpoint'} holds no EMA weights (train with --ema DECAY to "
                         f"keep them)")
    return ckpt["ema"]


def load_checkpoint(path, backend: str = "auto", map_location="cpu", ema: bool = False):
    """(model in eval mode, checkpoint dict) from a train.py checkpoint (see read_checkpoint), with its
    EMA weights when ema=True."""
    ckpt = read_checkpoint(path, map_location)
    model = build_model(ckpt["model_config"], backend)
    model.load_state_dict(checkpoint_weights(ckpt, ema, path))
    return model.eval(), ckpt


def checkpoint_sampling(ckpt: dict):
    """The ClipSampling a checkpoint was trained with: ckpt["sampling"], or for a checkpoint older than
    it, its arguments (--frames; --stride: a window that far apart, else one frame per segment)."""
    from tubevit_fast.app.sampling import ClipSampling

    if "sampling" in ckpt:
        return ClipSampling.from_dict(ckpt["sampling"])
    frames, stride = ckpt["model_config"]["frames"], ckpt["args"].get("stride")
    return ClipSampling(frames, stride, "window") if stride else ClipSampling(frames, 1, "segments")


def state_hash(model: torch.nn.Module) -> str:
    """sha256 of every state_dict tensor's bytes, in order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    return h.hexdigest()

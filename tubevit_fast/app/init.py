"""Where a new run's weights come from: `train --init PATH` and `--scale-from`.

    --init PATH takes
      a tubevit_fast checkpoint   fine-tuning: every tensor is loaded; the classifier (head.*)
                                  starts fresh when the class count or the class names differ
      a daniel-code/TubeViT one   convert.from_tubevit_port: the interpolated tube kernels and the
                                  encoder; the pooling head and classifier start fresh
      a timm / torchvision ViT    convert.from_image_vit on its state_dict: the encoder, the 2D tube
      state_dict                  (the patch projection) and the 3D tubes inflated from it; the
                                  pooling head and classifier start fresh
    --init LARGE_VIT --scale-from SMALL_CHECKPOINT: convert.scale_image_to_video, the paper's gated
      image-to-video model (the small run's 3D tubes through a learned width projection, the
      blocks before --gate-layer frozen).

The model's shape (width, depth, heads, MLP width, tube kernels) is the weights'; an image ViT's
state_dict does not record its heads: width / 64 unless --heads is given. Each source gives an
`Init`: the model config, the tensors to load (the fresh parts are left out, so they start from the
run's seeded initialisation) and the line `train` prints.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from tubevit_fast.app.checkpoint import TUBE_SETS, build_model, read_weights_file
from tubevit_fast.cli import UsageError, one_line

FRESH_HEAD = ("attn_pool", "head")


@dataclasses.dataclass
class Init:
    kind: str                  # what the file was, in words
    config: dict               # model shape keys for checkpoint.build_model
    state: dict                # tensors to load (strict=False: the fresh ones are absent)
    fresh: list[str]           # top-level modules that start from the run's initialisation
    frozen: list[str] = dataclasses.field(default_factory=list)  # parameters that do not train

    def describe(self, path: str) -> str:
        loaded = sorted({k.split(".")[0] for k in self.state})
        text = f"init: {path}: {self.kind}; loaded {len(self.state)} tensors ({', '.join(loaded)})"
        text += f"; fresh: {', '.join(self.fresh)}" if self.fresh else "; nothing fresh"
        if self.frozen:
            text += f"; frozen: {len(self.frozen)} parameters"
        return text


def _unwrap(obj) -> dict:
    """The state_dict inside the usual wrappers ({"model": ...}, {"state_dict": ...}, {"module": ...})."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("model", "state_dict", "module") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    return obj if isinstance(obj, dict) else {}


def _is_port(state: dict) -> bool:
    return any("sparse_tubes_tokenizer." in str(k) for k in state)


def _shape_config(model, tubes: str) -> dict:
    block = model.blocks[0]
    return dict(tubes=tubes, dim=model.dim, depth=len(model.blocks), heads=block.attn.num_heads,
                mlp_ratio=(block.mlp.fc1.out_features + 0.5) / model.dim, qkv_bias=block.attn.qkv.bias is not None)


def _without(state: dict, prefixes) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(tuple(p + "." for p in prefixes))}


def load_init(path: str, tubes: str, classes: list[str], num_classes: int, heads: int | None) -> Init:
    """The Init of --init PATH (see the module docstring); UsageError for a file that is none of them."""
    ckpt = read_weights_file(path)
    if isinstance(ckpt, dict) and {"model", "model_config"} <= ckpt.keys():
        cfg = ckpt["model_config"]
        same_head = cfg["num_classes"] == num_classes and list(cfg["classes"]) == list(classes)
        config = {k: v for k, v in cfg.items() if k not in ("num_classes", "classes", "frames", "size")}
        fresh = [] if same_head else ["head"]
        kind = "tubevit_fast checkpoint" + ("" if same_head else
                                            f" ({cfg['num_classes']} classes -> {num_classes}: new classifier)")
        return Init(kind, config, _without(ckpt["model"], fresh), fresh, list(ckpt.get("frozen", [])))
    state = _unwrap(ckpt)
    from tubevit_fast.convert import from_image_vit, from_tubevit_port

    try:
        if _is_port(state):
            with warnings.catch_warnings():  # its warning lists what starts fresh: the start line says so
                warnings.simplefilter("ignore")
                model, _ = from_tubevit_port(state, num_classes=num_classes, heads=heads, backend="reference")
            config = {**_shape_config(model, "paper"), "interpolated_from": list(model.tube_embed.interpolated_from)}
            kind = "daniel-code/TubeViT checkpoint (class token, position table, pooling and head not carried over)"
        else:
            model = from_image_vit(state, TUBE_SETS[tubes], num_classes, backend="reference", heads=heads)
            config = _shape_config(model, tubes)
            library = "timm" if any(k.startswith("patch_embed.") for k in state) else "torchvision"
            kind = f"{library} ViT state_dict (2D tube = its patch projection, 3D tubes inflated from it)"
    except (ValueError, TypeError) as err:
        raise UsageError(f"--init {path}: {one_line(err)}") from None
    return Init(kind, config, _without(model.state_dict(), FRESH_HEAD), list(FRESH_HEAD))


def load_scaled(large: str, small: str, gate_layer: int | None, num_classes: int, heads: int | None) -> Init:
    """The Init of --init LARGE --scale-from SMALL: the gated image-to-video model."""
    from tubevit_fast.app.checkpoint import read_checkpoint
    from tubevit_fast.convert import scale_image_to_video

    small_ckpt = read_checkpoint(small)
    small_model = build_model(small_ckpt["model_config"], "reference")
    small_model.load_state_dict(small_ckpt["model"])
    state = _unwrap(read_weights_file(large))
    tubes = small_ckpt["model_config"]["tubes"]
    try:
        depth = _vit_depth(state)
        gate = depth // 2 if gate_layer is None else gate_layer
        model, _ = scale_image_to_video(state, small_model, gate, num_classes, backend="reference", heads=heads)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--init {large} --scale-from {small}: {one_line(err)}") from None
    config = {**_shape_config(model, tubes), "gate_layer": gate, "source_dim": small_model.dim}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    kind = (f"image ViT state_dict scaled to video with {small}'s 3D tubes (width {small_model.dim} -> "
            f"{model.dim}), gate before block {gate}")
    return Init(kind, config, _without(model.state_dict(), FRESH_HEAD), list(FRESH_HEAD), frozen)


def _vit_depth(state: dict) -> int:
    import re

    ids = {m.group(1) for k in state if (m := re.match(r"(?:blocks\.|encoder\.layers\.encoder_layer_)(\d+)\.", k))}
    if not ids:
        raise ValueError("not an image ViT state_dict (no blocks.i or encoder.layers.encoder_layer_i)")
    return len(ids)

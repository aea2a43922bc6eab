"""attention_{clip}.png: where the model looks. The attention-pooling head's weights over the
tokens (its learned query's softmax, averaged over heads) are drawn back onto the clip: each
pixel gets the sum of the weights of the tokens that read it (geometry.spread_to_pixels). One
column per frame some tube reads; the clip above, the heat over a darkened grey copy below, one
scale for the whole clip (white = the hottest pixel)."""
from __future__ import annotations

import numpy as np
import torch

from tubevit_fast.geometry import spread_to_pixels
from tubevit_fast.viz.draw import heat_colours, save_png, sheet
from tubevit_fast.viz.sampling import frame_tile, frames_read


@torch.no_grad()
def attention_heat(model, clip: torch.Tensor) -> np.ndarray:
    """(T, H, W) float64 heat of a normalised (C, T, H, W) clip: per pixel, the summed head-mean
    pooling weight of the tokens that read it."""
    features = model.forward_features(model.tube_embed(clip[None]))
    weights = model.attn_pool.attention_probs(features)[0].mean(0)
    return spread_to_pixels(model.tube_embed.op_tubes, tuple(clip.shape[1:]), weights.double().cpu().numpy())


def draw_attention(display: np.ndarray, heat: np.ndarray, tubes, path: str, name: str, heads: int) -> str:
    """display (T, H, W, 3) in [0, 1], heat (T, H, W): write the picture to `path`."""
    frames = frames_read(tubes, heat.shape)
    unit = heat / heat.max() if heat.max() > 0 else heat
    grey = display.mean(-1, keepdims=True) * 0.5  # at most half intensity, so the heat stands out
    overlay = (1 - unit[..., None]) * grey + unit[..., None] * heat_colours(unit) / 255.0
    rows = [[frame_tile(display[t]) for t in frames], [frame_tile(overlay[t]) for t in frames]]
    title = (f"{name}: where the pooling head looks, the weight of its query on each token (mean over "
             f"{heads} heads)\nsummed over the pixels each token reads; grey, red, yellow, white = from 0 "
             f"up to the clip's hottest pixel ({heat.max():.3g})")
    return save_png(sheet(rows, title, ["clip", "attention"], [f"frame {t}" for t in frames]), path)

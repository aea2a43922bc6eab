"""The tubes' learned kernels, drawn like the paper's figure: each kernel on its own symmetric
colour scale around grey (draw.signed_colours), strongest (largest L2 norm) first.

  tube{i}_kernels.png  a 3D tube: one row per kernel, one column per time step; the 2D patch
                       tube: a grid of kernels, PER_ROW to a row
  tube{i}_kernels.gif  a 3D tube: one frame per time step, the kernels in a grid

With a second set of weights (--compare) each picture shows both side by side, the same kernel
in the same place (the order is that of the main weights)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from tubevit_fast.geometry import TubeSpec
from tubevit_fast.viz.draw import save_gif, save_png, sheet, signed_colours, zoom, zoom_for

PER_ROW = 8  # kernels per grid row (2D tube picture, GIF frames)
TILE = 48  # target tile side in pixels


def kernel_norms(weight: np.ndarray) -> np.ndarray:
    """The L2 norm of each kernel of (n, C, kt, kh, kw) weights, float64."""
    return np.sqrt((weight.reshape(weight.shape[0], -1).astype(np.float64) ** 2).sum(1))


def norm_order(weight: np.ndarray) -> np.ndarray:
    """Kernel indices by decreasing L2 norm (ties keep their index order)."""
    return np.argsort(-kernel_norms(weight), kind="stable")


def _panel_grid(colours: list[np.ndarray], t: int, rows: int) -> list[list[np.ndarray | None]]:
    """Time step t of each kernel (colours: (kt, h, w, 3) each), PER_ROW to a row, `rows` rows."""
    cells = [c[t] for c in colours] + [None] * (rows * PER_ROW - len(colours))
    return [cells[r * PER_ROW:(r + 1) * PER_ROW] for r in range(rows)]


def _side_by_side(panels: list[list[list]]) -> list[list]:
    """Join panels (each a list of rows) left to right, one empty column between them."""
    joined = []
    for r in range(len(panels[0])):
        row = list(panels[0][r])
        for panel in panels[1:]:
            row += [None, *panel[r]]
        joined.append(row)
    return joined


def draw_tube_kernels(index: int, tube: TubeSpec, weights: Sequence[tuple[str, torch.Tensor]], out: str,
                      max_filters: int) -> list[str]:
    """Write tube `index`'s pictures into `out`; weights: (name, (n, C, kt, kh, kw) kernels) panels, the
    last one the main weights (its norms set the order). Returns the written paths."""
    arrays = [(name, w.detach().float().cpu().numpy()) for name, w in weights]
    main = arrays[-1][1]
    n, kt, kh, kw = min(max_filters, main.shape[0]), *main.shape[2:]
    order, grid_rows = norm_order(main)[:n], -(-n // PER_ROW)
    factor = zoom_for(kh, kw, TILE)
    # Each kernel on its own scale, over all its time steps (so a fade in time stays visible).
    colours = [[np.stack([zoom(f, factor) for f in signed_colours(w[k])]) for k in order] for _, w in arrays]
    names = " | ".join(name for name, _ in arrays)
    what = f"tube {index}: kernel {tube.kernel} (t, h, w), {n} of {main.shape[0]} by norm"
    legend = "grey = 0, each kernel on its own scale"
    if len(arrays) > 1:
        legend += f"; left to right: {names}"
    written = []
    if kt == 1:
        tiles = _side_by_side([_panel_grid(c, 0, grid_rows) for c in colours])
        labels = [f"{r * PER_ROW + 1}-{min(n, (r + 1) * PER_ROW)}" for r in range(grid_rows)]
        image = sheet(tiles, f"{what}, row-major\n{legend}", labels)
    else:
        tiles = _side_by_side([[list(kernel) for kernel in c] for c in colours])
        norms = [kernel_norms(w) for _, w in arrays]
        labels = [f"#{k}  |w| " + " | ".join(f"{panel[k]:.3g}" for panel in norms) for k in order]
        # Over a compared pair, each panel's first column also carries the panel's name.
        steps = [[f"{name}\nt=0" if len(arrays) > 1 else "t=0"] + [f"t={t}" for t in range(1, kt)]
                 for name, _ in arrays]
        image = sheet(tiles, f"{what}, one column per time step\n{legend}", labels,
                      _side_by_side([[s] for s in steps])[0])
    written.append(save_png(image, os.path.join(out, f"tube{index}_kernels.png")))
    if kt > 1:
        frames = [sheet(_side_by_side([_panel_grid(c, t, grid_rows) for c in colours]),
                        f"tube {index}: kernel {tube.kernel}, t = {t} of 0-{kt - 1}\n{legend}")
                  for t in range(kt)]
        written.append(save_gif(frames, os.path.join(out, f"tube{index}_kernels.gif")))
    return written

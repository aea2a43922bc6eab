import math

import pytest
import torch

from tubevit_fast import PAPER_TUBES, TubeSpec, tube_position_embedding
from tubevit_fast.geometry import image_tubes


def test_shape_dtype_and_zero_remainder():
    pos = tube_position_embedding(PAPER_TUBES, (32, 224, 224), 20)  # m = 3, 2 channels left over
    assert pos.shape == (539, 20) and pos.dtype == torch.float32
    assert (pos[:, 18:] == 0).all()
    assert (pos[:, :18] != 0).any(dim=0).all()


def test_values_at_a_hand_computed_centre():
    dim = 768
    m = dim // 6
    pos = tube_position_embedding(PAPER_TUBES, (32, 224, 224), dim)
    # tube 2 (index 1), grid index (1, 2, 3) on a 3x7x7 grid; tube 1 has 98 tokens before it
    row = pos[98 + (1 * 7 + 2) * 7 + 3].double()
    centre = (4 + 1 * 6 + 15 / 2, 8 + 2 * 32 + 3 / 2, 8 + 3 * 32 + 3 / 2)
    for j in (0, 1, 17, m - 1):
        w = 10000.0 ** (-j / m)
        expected = []
        for c in centre:
            expected += [math.sin(c * w), math.cos(c * w)]
        assert row[6 * j: 6 * j + 6].tolist() == pytest.approx(expected, abs=1e-6)


def test_rows_are_distinct():
    pos = tube_position_embedding(PAPER_TUBES, (32, 224, 224), 96)
    assert torch.unique(pos, dim=0).shape[0] == pos.shape[0]


def test_cache_returns_the_same_tensor():
    a = tube_position_embedding(PAPER_TUBES, (32, 224, 224), 192)
    b = tube_position_embedding(list(PAPER_TUBES), [32, 224, 224], 192)
    assert a is b
    assert tube_position_embedding(PAPER_TUBES, (32, 224, 224), 198) is not a


def test_image_tokens_have_zero_temporal_centre():
    pos = tube_position_embedding(image_tubes(PAPER_TUBES), (1, 224, 224), 60)
    assert pos.shape == (196, 60)
    sin_t, cos_t = pos[:, 0::6], pos[:, 1::6]
    assert (sin_t == 0).all() and (cos_t == 1).all()


def test_rejects_small_dim_and_small_input():
    with pytest.raises(ValueError, match="dim >= 6"):
        tube_position_embedding(PAPER_TUBES, (32, 224, 224), 5)
    with pytest.raises(ValueError, match=r"too small for tube 1"):
        tube_position_embedding([TubeSpec((1, 2, 2), (1, 2, 2)), TubeSpec((4, 2, 2), (1, 2, 2))], (3, 8, 8), 12)


def test_torch_compile_traces_it_without_the_lru_cache_warning():
    import warnings

    def add_pos(x):
        return x + tube_position_embedding(PAPER_TUBES, (32, 224, 224), 12)

    x = torch.randn(539, 12)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(add_pos, fullgraph=True, backend="eager")(x)
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    torch.testing.assert_close(out, add_pos(x))

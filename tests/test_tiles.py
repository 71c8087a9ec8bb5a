"""The tiled token kernel at every candidate tile and both vector widths, against the dense masked ops: tiles
the tuner may pick must all be exact, not just the one a machine happens to choose. Shapes hit the edges a
tile has: live rows not a multiple of the tile's rows, ablated rows, a fan-in that leaves a partial K chunk,
token counts that are not whole vectors (padding) or not whole tiles (the narrower last tile)."""

import pytest
import torch
import torch.nn.functional as F

from sparsecc.core import formats
from sparsecc.runtimes import unavailable
from sparsecc.runtimes.tvm import kernels as tvm_kernels, runtime as tvm_runtime
from sparsecc.tooling.synthetic import fanin_mask
from tests.conftest import assert_equivalent

pytestmark = pytest.mark.skipif(unavailable("tvm") is not None, reason=f"TVM not installed: {unavailable('tvm')}")

#: Beyond the tuner's: odd shapes, and windows of 1 KiB, so that the small layers here sweep many windows (rows
#: stepping together, then each alone for its rest of a window, and rows left over from the tile's rows).
EXTRA = (tvm_kernels.Tile(1, 1, 0), tvm_kernels.Tile(5, 2, 8), tvm_kernels.Tile(2, 3, 0), tvm_kernels.Tile(1, 13, 16),
         tvm_kernels.Tile(2, 3, 0, 1), tvm_kernels.Tile(3, 2, 0, 1), tvm_kernels.Tile(1, 4, 0, 1))


def _tiles(k: int, tokens: int, lanes: int) -> tuple:
    return tvm_kernels.candidates(k, tvm_kernels.padded(tokens, lanes), lanes) + EXTRA


@pytest.fixture(params=[8, 16], ids=["8 lanes", "16 lanes"])
def lanes(request, monkeypatch):
    """Both widths on any x86 host: 16-lane kernels are legal LLVM vectors on AVX2 too (split in two)."""
    monkeypatch.setattr(tvm_runtime, "lanes", lambda: request.param)
    return request.param


@pytest.mark.parametrize("tokens,bias", [(5, False), (40, True)])
def test_linear_every_tile(lanes, tokens, bias):
    out_f, in_f = 29, 150
    w = torch.randn(out_f, in_f)
    mask = fanin_mask(w, 0.75, 0.2)                 # k = 37 (chunks of 8/16/32 leave a tail); 20% rows ablated
    enc = formats.encode_fanin(w * mask, mask, int(mask.sum(1).max()))
    b = torch.randn(out_f) if bias else None
    bound = tvm_runtime.BoundLinear(enc.values, enc.indices, enc.rows, b, out_f)
    x = torch.randn(tokens, in_f)
    expected = F.linear(x, w * mask, b)
    tiles = _tiles(enc.values.shape[1], tokens, lanes)
    assert len(tiles) >= 6
    for tile in tiles:
        assert_equivalent(bound.sparse(x, tile), expected)


@pytest.mark.parametrize("conv", [dict(padding=1), dict(stride=2, padding=1), dict(stride=2, padding=1, groups=2)],
                         ids=["direct", "phase-planes", "unfold"])
def test_conv_every_tile(lanes, conv):
    groups = conv.get("groups", 1)
    w = torch.randn(12, 6 // groups, 3, 3)
    mask = fanin_mask(w, 0.8, 0.1)
    enc = formats.encode_fanin((w * mask).view(12, -1), mask.view(12, -1), int(mask.view(12, -1).sum(1).max()))
    b = torch.randn(12)
    params = dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1])
    params.update({name: [value, value] for name, value in conv.items() if name != "groups"})
    bound = tvm_runtime.BoundConv2d(enc.values, enc.indices, enc.rows, b, 12, [3, 3], params["stride"],
                                    params["padding"], params["dilation"], groups, 6)
    assert bound.direct == (groups == 1)
    x = torch.randn(1, 6, 9, 11)
    expected = F.conv2d(x, w * mask, b, **conv)
    for tile in _tiles(enc.values.shape[1], bound.tokens(x), lanes):
        assert_equivalent(bound.sparse(x, tile), expected)


def test_tile_names_round_trip():
    for tile in tvm_kernels.TILES + EXTRA:
        assert tvm_kernels.Tile.parse(tile.name()) == tile
    with pytest.raises(ValueError, match="not a tile name"):
        tvm_kernels.Tile.parse("r2v4")


def test_candidates_drop_tiles_that_are_the_same_kernel():
    # k = 10: every chunk is the whole fan-in; 16 padded tokens at 16 lanes: every tile is one vector wide
    tiles = tvm_kernels.candidates(10, 16, 16)
    assert all(t.chunk == 0 and t.vectors == 1 for t in tiles)
    assert len(set(tiles)) == len(tiles) == len({t.rows for t in tvm_kernels.TILES})


def test_token_tiles_are_balanced():
    assert tvm_kernels.token_tiles(208, 16, 4) == [(4, 0, 1), (3, 4, 3)]       # 13 vectors: 4+3+3+3
    assert tvm_kernels.token_tiles(192, 16, 4) == [(4, 0, 3)]
    assert tvm_kernels.token_tiles(16, 16, 8) == [(1, 0, 1)]
    for total in range(1, 40):
        for most in (1, 2, 3, 4, 5, 8, 13):
            runs = tvm_kernels.token_tiles(total * 8, 8, most)
            covered = [v for w, start, count in runs for i in range(count) for v in range(start + i * w,
                                                                                      start + (i + 1) * w)]
            assert covered == list(range(total))
            widths = {w for w, _, _ in runs}
            assert max(widths) <= most and max(widths) - min(widths) <= 1


def test_windows_cut_every_row_at_the_same_inputs():
    out_f, in_f, k = 40, 300, 30
    indices = torch.stack([torch.randperm(in_f)[:k].sort().values for _ in range(out_f)]).to(torch.int16)
    bound = tvm_runtime.BoundLinear(torch.randn(out_f, k), indices, None, None, out_f)
    tile = tvm_kernels.Tile(2, 2, 0, 1)
    count = bound.window_count(tile, 64)
    assert count > 4
    bound.windows(tile, 64)
    table, _ = bound.window_tables[count]
    assert table.shape == (out_f, count + 1) and table.dtype == torch.int32
    assert (table[:, 0] == 0).all() and (table[:, -1] == k).all() and (table[:, 1:] >= table[:, :-1]).all()
    edges = torch.linspace(0, int(indices.max()) + 1, count + 1).round().long()
    for r in range(out_f):
        for w in range(count):
            run = indices[r, table[r, w]:table[r, w + 1]].long()
            assert ((run >= edges[w]) & (run < edges[w + 1])).all()      # the same window in every row


def test_windowed_tiles_need_sorted_indices(lanes):
    out_f, in_f = 24, 1200                          # k = 120: beyond the compiled-in fan-ins
    w = torch.randn(out_f, in_f)
    mask = fanin_mask(w, 0.9, 0.0)
    enc = formats.encode_fanin(w * mask, mask, int(mask.sum(1).max()))
    x = torch.randn(64, in_f)
    bound = tvm_runtime.BoundLinear(enc.values, enc.indices, None, None, out_f)
    assert any(t.window for t in bound.tiles(x))
    shuffled = torch.stack([torch.randperm(enc.values.shape[1]) for _ in range(out_f)])
    unsorted = tvm_runtime.BoundLinear(enc.values.gather(1, shuffled), enc.indices.gather(1, shuffled), None, None,
                                       out_f)
    tiles = unsorted.tiles(x)
    assert tiles and not any(t.window for t in tiles)
    for tile in tiles:
        assert_equivalent(unsorted.sparse(x, tile), F.linear(x, w * mask))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_windowed_tiles_take_16_bit_inputs(lanes, dtype):
    """A bf16 input reaches the windowed kernel as 32-bit words of two tokens (two accumulators a load), an fp16
    one widened: both equal the layer in its dtype, and the float32 path bit for bit."""
    out_f, in_f = 30, 700                            # k = 140 at 80%: windows are offered
    w = torch.randn(out_f, in_f)
    mask = fanin_mask(w, 0.8, 0.1)
    enc = formats.encode_fanin(w * mask, mask, int(mask.sum(1).max()))
    bound = tvm_runtime.BoundLinear(enc.values.to(dtype), enc.indices, enc.rows, None, out_f)
    x = torch.randn(45, in_f).to(dtype)
    expected = F.linear(x, (w * mask).to(dtype))
    offered = [t for t in bound.tiles(x) if t.window]
    assert offered
    for tile in offered + [tvm_kernels.Tile(2, 2, 0, 1), tvm_kernels.Tile(1, 4, 0, 1)]:
        y = bound.sparse(x, tile)
        assert y.shape == expected.shape and y.dtype == dtype
        assert_equivalent(y, expected)
        torch.testing.assert_close(y, bound.sparse(x.float(), tile).to(dtype), rtol=0, atol=0)

"""Window, spatial, temporal and parallel attention against dense attention with the equivalent mask."""
import pytest
import torch

from architectures.attention import (FullAttention, ParallelSpatialTemporal, SpatialAttention, TemporalAttention,
                                     WindowAttention, dense_attention, make_self_attention)
from architectures.attention.window import fit_window

GRID = (4, 4, 6)  # frames, rows, cols -> 96 tokens
N = GRID[0] * GRID[1] * GRID[2]


def qkv(batch=2, heads=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, N, dim, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(3)]


MODULES = {
    "window": lambda: WindowAttention(24, 3, 8, window=(2, 4, 4)),  # cols: 6 -> window 3 (largest divisor <= 4)
    "window-clipped": lambda: WindowAttention(24, 3, 8, window=(8, 8, 8)),  # whole grid: equals full attention
    "spatial": lambda: SpatialAttention(24, 3, 8),
    "temporal": lambda: TemporalAttention(24, 3, 8),
}


@pytest.mark.parametrize("kind", MODULES)
def test_core_equals_masked_dense_attention_outputs_and_gradients(kind):
    module = MODULES[kind]()
    module.grid = GRID
    q, k, v = qkv()
    out = module.core(q, k, v)
    ref = dense_attention(q, k, v, attn_mask=module.reference_mask(GRID))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_reference_masks_have_the_expected_structure():
    spatial = SpatialAttention(24, 3, 8).reference_mask(GRID)
    temporal = TemporalAttention(24, 3, 8).reference_mask(GRID)
    assert spatial.sum(1).eq(GRID[1] * GRID[2]).all()  # a whole frame
    assert temporal.sum(1).eq(GRID[0]).all()  # one position in every frame
    assert (spatial & temporal).equal(torch.eye(N, dtype=torch.bool))  # they meet only at the token itself
    window = WindowAttention(24, 3, 8, window=(2, 4, 4)).reference_mask(GRID)
    assert window.sum(1).eq(2 * 4 * 3).all()
    assert WindowAttention(24, 3, 8, window=(8, 8, 8)).reference_mask(GRID).all()


def test_fit_window_shrinks_to_a_divisor():
    assert fit_window((16, 16, 16), (4, 8, 8)) == (4, 8, 8)
    assert fit_window((5, 6, 2), (4, 4, 8)) == (1, 3, 2)


@pytest.mark.parametrize("kind", ["full", "window", "serial", "parallel"])
def test_modules_keep_shape_and_pass_gradients(kind):
    from architectures.dit import DiTConfig

    module = make_self_attention(kind, 24, 3, 8, DiTConfig(attention=kind, window_size=(2, 2, 3)))
    x = torch.randn(2, N, 24, requires_grad=True)
    out = module(x, GRID)
    assert out.shape == (2, N, 24)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the parallel module's temporal branch starts at zero: its output projection receives gradient
    assert all(p.grad is not None for p in module.parameters())


def test_parallel_is_spatial_plus_temporal_and_starts_as_spatial():
    module = ParallelSpatialTemporal(24, 3, 8)
    x = torch.randn(1, N, 24)
    torch.testing.assert_close(module(x, GRID), module.spatial(x, GRID))  # temporal output is zero at init
    torch.nn.init.normal_(module.temporal.out.weight)
    torch.testing.assert_close(module(x, GRID), module.spatial(x, GRID) + module.temporal(x, GRID))


def test_full_attention_core_is_sdpa_and_unknown_kind_is_refused():
    module = FullAttention(24, 3, 8)
    q, k, v = qkv()
    torch.testing.assert_close(module.core(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="unknown attention kind 'nope'"):
        make_self_attention("nope", 24, 3, 8, None)


def test_attention_runs_inside_an_attention_profiler_region():
    module = WindowAttention(24, 3, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(torch.randn(1, N, 24), GRID)
    assert any(e.name == "attention" for e in prof.events())

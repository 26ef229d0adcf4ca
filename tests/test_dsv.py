"""DSV: exact block-sparse attention, block selection, the estimator, profiling and the stage switch."""
import functools
import math
import warnings

import pytest
import torch

import architectures
from architectures.attention import dsv, flex, sparse
from architectures.attention import (DSVAttention, block_mask_to_token_mask, block_sparse_attention, dense_attention,
                                     estimate_block_scores, select_blocks)


def rand(*shape, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def random_block_mask(B, H, nq, nk, seed=0):
    """Ragged rows (different block counts), each with at least one block."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, nq, nk, generator=g) < 0.4
    mask[..., torch.randint(nk, (1,), generator=g)] = True
    return mask


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("chunk", [1 << 22, 2048])  # 2048: query blocks gathered in several chunks
@pytest.mark.parametrize("tokens,block", [(128, 32), (200, 32)])  # 200: the last block is partial (padding)
def test_block_sparse_equals_dense_restricted_to_the_blocks(tokens, block, chunk, recompute, monkeypatch):
    monkeypatch.setattr(sparse, "CPU_CHUNK_ELEMENTS", chunk)
    q, k, v = (rand(2, 3, tokens, 16, seed=s) for s in range(3))
    nb = math.ceil(tokens / block)
    mask = random_block_mask(2, 3, nb, nb)
    out = block_sparse_attention(q, k, v, mask, block, backend="gather", recompute=recompute)
    ref = dense_attention(q, k, v, attn_mask=block_mask_to_token_mask(mask, block, tokens, tokens))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("tokens,block,ragged", [(256, 64, False), (200, 64, True), (330, 32, True)])
def test_gather_kernel_is_exact_in_fp32_and_fp64(tokens, block, ragged, recompute, dtype, tol, monkeypatch):
    """Forward and gradients equal dense attention restricted to the same keys: uneven token counts (a partial
    last block), rows with different numbers of blocks, several chunks, saved or recomputed probabilities."""
    monkeypatch.setattr(sparse, "CPU_CHUNK_ELEMENTS", 3 * block * block)  # a few query blocks per chunk
    q, k, v = (rand(2, 3, tokens, 16, seed=s).to(dtype).detach().requires_grad_() for s in range(3))
    nb = math.ceil(tokens / block)
    if ragged:
        mask = random_block_mask(2, 3, nb, nb, seed=1)
        assert mask.sum(-1).unique().numel() > 1
        kmax, uniform = None, False
    else:  # every row keeps kmax blocks: the kernel runs without a mask
        scores = torch.rand(2, 3, nb, nb, generator=torch.Generator().manual_seed(1))
        kmax, uniform = 2, True
        mask = select_blocks(scores, kmax)
    out = block_sparse_attention(q, k, v, mask, block, backend="gather", recompute=recompute, kmax=kmax,
                                 uniform=uniform)
    ref = dense_attention(q, k, v, attn_mask=block_mask_to_token_mask(mask, block, tokens, tokens))
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("recompute", [False, True])
def test_token_level_gather_is_exact(recompute):
    """gather_token_attention (pieces of one key) equals dense attention masked to each block's own keys."""
    q, k, v = (rand(1, 2, 100, 8, seed=s) for s in range(3))
    block, nq = 32, 4
    g = torch.Generator().manual_seed(3)
    keys = torch.stack([torch.randperm(100, generator=g)[:20] for _ in range(2 * nq)]).view(1, 2, nq, 20)
    out = dsv.gather_token_attention(q, k, v, keys, block, 8 ** -0.5, recompute)
    token_mask = torch.zeros(1, 2, nq, 100, dtype=torch.bool).scatter_(-1, keys, True)
    ref = dense_attention(q, k, v, attn_mask=token_mask.repeat_interleave(block, -2)[..., :100, :])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gather_kernel_keeps_its_probabilities_only_without_recompute():
    """Without recompute the kernel saves the probabilities P of every computed score (and counts no score
    matmul in backward); recompute saves only inputs, output and log-sum-exp, as SDPA does."""
    from stbench.measure import activations, flops

    q, k, v = (rand(1, 2, 256, 16, seed=s).float().detach().requires_grad_() for s in range(3))
    mask = select_blocks(torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)), 2)
    tiles = 1 * 2 * 4 * 2  # heads x query blocks x kept blocks
    saved, counted = {}, {}
    for recompute in (False, True):
        def step():
            out = block_sparse_attention(q, k, v, mask, 64, backend="gather", recompute=recompute, kmax=2)
            out.backward(torch.ones_like(out))
        with activations.SavedTensorCounter() as counter:
            block_sparse_attention(q, k, v, mask, 64, backend="gather", recompute=recompute, kmax=2)
        saved[recompute] = counter.total_bytes
        counted[recompute] = flops.count_flops(step)
        assert counted[recompute] == sum(sparse.tile_flops(tiles, 64, 64, 16, scores_recomputed=recompute))
    rows = 1 * 2 * 4  # query blocks of all heads: one log-sum-exp per query
    assert saved[False] - saved[True] == tiles * 64 * 64 * 4 - rows * 64 * 4  # P instead of the lse, fp32
    assert counted[True] - counted[False] == 2 * tiles * 64 * 64 * 16  # the score matmul QK^T
    with torch.no_grad():  # nothing to keep: the same result from the workspace
        torch.testing.assert_close(block_sparse_attention(q, k, v, mask, 64, backend="gather", kmax=2),
                                   block_sparse_attention(q, k, v, mask, 64, backend="gather", recompute=True, kmax=2))


def test_every_block_selected_equals_full_attention():
    q, k, v = (rand(1, 2, 192, 8, seed=s) for s in range(3))
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, mask, 64)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_select_blocks_keeps_the_top_k_per_head():
    scores = torch.rand(2, 3, 4, 10, generator=torch.Generator().manual_seed(0))
    mask = select_blocks(scores, torch.tensor([1, 4, 10]))
    assert mask.sum(-1)[:, 0].eq(1).all() and mask.sum(-1)[:, 1].eq(4).all() and mask.all(-1)[:, 2].all()
    top = scores.topk(4, -1).indices[:, 1]
    assert mask[:, 1].gather(-1, top).all()
    assert select_blocks(scores, 2).sum(-1).eq(2).all()


def test_estimated_block_scores_are_block_masses():
    q_est, k_est = rand(1, 2, 100, 4, grad=False), rand(1, 2, 100, 4, seed=1, grad=False)
    scores = estimate_block_scores(q_est, k_est, 32, 0.5)
    assert scores.shape == (1, 2, 4, 4)
    torch.testing.assert_close(scores.sum(-1), torch.ones(1, 2, 4, dtype=scores.dtype))
    # one query block: its pooled query's softmax over keys, summed per key block
    pooled = q_est[:, :, 32:64].mean(2, keepdim=True)
    probs = torch.softmax(pooled @ k_est.transpose(-1, -2) * 0.5, -1)[..., :96].view(1, 2, 1, 3, 32).sum(-1)
    torch.testing.assert_close(scores[:, :, 1:2, :3], probs.float())


def planted(heads=2, tokens=256, dim=32, block=32, seed=0):
    """q, k where query block i attends sharply to key block perm(i) (head 1: uniform, zero queries)."""
    g = torch.Generator().manual_seed(seed)
    nb = tokens // block
    centres = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:nb] * 6  # orthogonal directions
    perm = torch.randperm(nb, generator=g)
    q = centres[perm].repeat_interleave(block, 0) + 0.3 * torch.randn(tokens, dim, generator=g)
    k = centres.repeat_interleave(block, 0) + 0.3 * torch.randn(tokens, dim, generator=g)
    q, k = q.expand(1, heads, -1, -1).clone(), k.expand(1, heads, -1, -1).clone()
    q[:, 1:] = 0  # uniform attention: nothing to skip
    return q, k, torch.randn(1, heads, tokens, dim, generator=g)


def test_estimator_loss_falls_and_recall_rises_on_planted_structure():
    torch.manual_seed(0)
    q, k, v = planted(heads=1)
    attn = DSVAttention(32, 1, 32, rank=8, block_size=32, sparsity=0.875, estimator_samples=64)  # 1 of 8 blocks
    with torch.no_grad():
        attn.k_estimator.normal_()  # independent of q_estimator: the initial estimate is noise
    opt = torch.optim.Adam([attn.q_estimator, attn.k_estimator], lr=3e-2)
    attn.train()
    losses = []

    def recall():
        attn.capture_stats = True
        with torch.no_grad():
            attn.core(q, k, v)
        attn.capture_stats = False
        return attn.stats(query_blocks=8)["recall"]

    recalls = [recall()]
    for _ in range(150):
        attn.core(q, k, v)
        losses.append(float(attn.estimator_loss.detach()))
        opt.zero_grad()
        attn.estimator_loss.backward()
        opt.step()
    recalls.append(recall())
    assert losses[-1] < 0.5 * losses[0]
    assert recalls[0] < 0.5 and recalls[1] > 0.95, recalls


def test_profiling_then_stage_two_sends_only_sparse_heads_to_sparse_attention():
    q, k, v = planted()
    attn = DSVAttention(64, 2, 32, block_size=32, sparsity_threshold=0.5, profile_momentum=0.5).train()
    for _ in range(3):
        attn.core(q, k, v)
    sparsity = attn.profiled_sparsity
    assert sparsity[0] >= 0.85 and sparsity[1] < 0.2, sparsity  # 1 of 8 blocks vs all 8
    assert not attn.sparse_heads(8).any()  # still stage 1
    attn.sparse_active = True
    assert attn.sparse_heads(8).tolist() == [True, False]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    attn.double()
    out = attn.core(q64, k64, v64)
    with torch.no_grad():
        q_est, k_est = attn.estimate(q64, k64, slice(0, 2))
        mask = select_blocks(estimate_block_scores(q_est, k_est, 32, 32 ** -0.5), attn.head_topk(8))
    ref = dense_attention(q64, k64, v64, attn_mask=block_mask_to_token_mask(mask, 32, 256, 256))
    torch.testing.assert_close(out[:, 0], ref[:, 0])  # the sparse head: restricted to its blocks
    torch.testing.assert_close(out[:, 1], dense_attention(q64, k64, v64)[:, 1])  # the dense head: full attention


def test_model_switches_stage_at_dense_steps_and_counts_its_steps():
    torch.manual_seed(0)
    model = architectures.build("dit-dsv", "tiny", dense_steps=2, sparsity=0.5, block_size=16)
    batch = model.make_batch(1, 4, 64, 64)  # 4 x 4 x 4 = 64 tokens: block 16 -> 4 blocks
    seen = []
    for _ in range(4):
        model.loss(batch).backward()
        seen.append([bool(layer.last_sparse_heads.all()) for layer in model.dsv_layers()])
    assert seen == [[False, False], [False, False], [True, True], [True, True]]
    assert model.steps_done == 4
    with torch.no_grad():
        model.loss(batch)  # evaluation does not count as a training step
    assert model.steps_done == 4


def test_threshold_decides_which_heads_go_sparse_in_the_model():
    model = architectures.build("dit-dsv", "tiny", dense_steps=0, block_size=16, sparsity_threshold=0.5)
    batch = model.make_batch(1, 4, 64, 64)
    for layer in model.dsv_layers():
        layer.profiled_sparsity.copy_(torch.tensor([0.9, 0.2]))
        layer.profile_updates.fill_(1)
    with torch.no_grad():
        model(*[batch.latents, batch.timesteps, batch.text])
    assert all(layer.last_sparse_heads.tolist() == [True, False] for layer in model.dsv_layers())
    stats = model.dsv_stats()
    assert stats["sparse_head_fraction"] == 0.5
    assert stats["layer_sparsity"] == [pytest.approx(0.75 / 2)] * 2  # head 0 keeps 1 of 4 blocks, head 1 dense
    assert 0.0 <= stats["estimator_recall"] <= 1.0 + 1e-6 and stats["rel_error"] >= 0.0


def test_dsv_stats_is_lazy_and_leaves_training_state_alone():
    model = architectures.build("dit-dsv", "tiny", dense_steps=0, sparsity=0.5, block_size=16)
    assert model.dsv_stats() is None  # nothing run yet
    model.loss(model.make_batch(2, 4, 64, 64)).backward()
    assert all(layer._last is None for layer in model.dsv_layers())  # a training step keeps no q, k, v
    profile = [layer.profiled_sparsity.clone() for layer in model.dsv_layers()]
    stats = model.dsv_stats()
    assert set(stats) >= {"layer_sparsity", "estimator_recall", "sparse_head_fraction", "rel_error"}
    assert stats["layer_sparsity"] == [0.5, 0.5] and stats["sparse_head_fraction"] == 1.0
    assert 0.0 < stats["rel_error"] < 1.0 and 0.0 < stats["estimator_recall"] <= 1.0 + 1e-6
    assert model.steps_done == 1 and all(layer._last is None for layer in model.dsv_layers())
    assert all(torch.equal(a, layer.profiled_sparsity) for a, layer in zip(profile, model.dsv_layers()))


def test_estimator_trains_on_its_own_loss_and_optimizer_not_the_models():
    torch.manual_seed(0)
    model = architectures.build("dit-dsv", "tiny", estimator_lr=1e-2)
    layer = model.dsv_layers()[0]
    before = [layer.q_estimator.detach().clone(), layer.k_estimator.detach().clone()]
    captured, gradients, step = {}, layer.estimator_gradients, layer.apply_estimator_step

    def loss_spy():  # the gradients of the estimator's own loss, computed here as the reference
        captured["grads"] = torch.autograd.grad(layer.estimator_loss, [layer.q_estimator, layer.k_estimator],
                                                retain_graph=True)
        return gradients()

    def step_spy(scale=1.0):
        captured["scale"] = scale
        step(scale)

    layer.estimator_gradients, layer.apply_estimator_step = loss_spy, step_spy
    model.loss(model.make_batch(1, 2, 32, 32)).backward()
    assert layer.q_estimator.grad is None and layer.k_estimator.grad is None  # the model's loss never reaches it
    assert not {id(p) for p in (layer.q_estimator, layer.k_estimator)} & {id(p) for p in model.trainable_parameters()}
    reference = [torch.nn.Parameter(p) for p in before]
    opt = torch.optim.Adam(reference, lr=1e-2)
    for p, g in zip(reference, captured["grads"]):
        p.grad = g
    opt.step()
    assert captured["scale"] == 1.0  # stage 1: the full estimator learning rate
    torch.testing.assert_close(layer.q_estimator.detach(), reference[0].detach())
    torch.testing.assert_close(layer.k_estimator.detach(), reference[1].detach())


@pytest.mark.parametrize("tokens,block", [(256, 64), (200, 64), (384, 128), (300, 32), (300, 256)])
def test_flex_block_mask_is_exact_with_eager_flex_on_cpu(tokens, block, monkeypatch):
    """The BlockMask (128-token blocks + exact mask_mod) through FlexAttention's eager reference (forward)."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex, "_compiled_flex", flex_attention)
    q, k, v = (rand(1, 2, tokens, 16, seed=s, grad=False).float() for s in range(3))
    nb = math.ceil(tokens / block)
    mask = random_block_mask(1, 2, nb, nb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile"
        out = flex.flex_block_sparse_attention(q, k, v, mask, block, 0.25)
    ref = dense_attention(q, k, v, attn_mask=block_mask_to_token_mask(mask, block, tokens, tokens), scale=0.25)
    torch.testing.assert_close(out, ref)


def test_flex_compiles_once_per_shape_and_fails_loudly_past_its_recompile_limit(monkeypatch):
    """Dynamo's guards as on CUDA (aot_eager: no kernel compiler needed): a new block selection of the same
    shape reuses the compiled graph; past FLEX_RECOMPILE_LIMIT it raises instead of running unfused."""
    from torch._dynamo.exc import FailOnRecompileLimitHit
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    monkeypatch.setattr(flex, "_compiled_flex", None)
    monkeypatch.setattr(flex, "FLEX_RECOMPILE_LIMIT", 2)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)  # flex raises it for its own calls

    def run(heads, seed):
        q, k, v = (rand(1, heads, 200, 16, seed=s, grad=False).float() for s in range(3))
        mask = random_block_mask(1, heads, 4, 4, seed=seed)
        out = flex.flex_block_sparse_attention(q, k, v, mask, 64, 0.25)
        ref = dense_attention(q, k, v, attn_mask=block_mask_to_token_mask(mask, 64, 200, 200), scale=0.25)
        torch.testing.assert_close(out, ref)

    try:
        for seed in range(3):
            run(2, seed)
        assert counter.frame_count == 1
        run(3, 0)  # another head count: a second compile, within the raised limit
        assert counter.frame_count == 2
        with pytest.raises(FailOnRecompileLimitHit):
            run(4, 0)
    finally:
        torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_dim", [64, 96])
def test_flex_attention_agrees_with_gather_on_cuda(head_dim):
    q, k, v = (torch.randn(1, 2, 1000, head_dim, device="cuda", requires_grad=True) for _ in range(3))
    mask = random_block_mask(1, 2, 16, 16).cuda()
    flex = block_sparse_attention(q, k, v, mask, 64, backend="flex")
    gather = block_sparse_attention(q, k, v, mask, 64, backend="gather")
    torch.testing.assert_close(flex, gather, rtol=2e-3, atol=2e-3)
    gf = torch.autograd.grad(flex.sum(), (q, k, v))
    gg = torch.autograd.grad(gather.sum(), (q, k, v))
    for a, b in zip(gf, gg):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dit_dsv_trains_with_flex_attention_on_cuda():
    model = architectures.build("dit-dsv", "tiny", device="cuda", dense_steps=1, sparsity=0.75)
    batch = model.make_batch(1, 8, 128, 128, device="cuda")  # 8 x 8 x 8 = 512 tokens: 8 blocks of 64
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss) and not any(layer.warnings for layer in model.dsv_layers())
    assert all(layer.last_sparse_heads.all() for layer in model.dsv_layers())
    assert model.dsv_stats()["layer_sparsity"] == [0.75, 0.75]

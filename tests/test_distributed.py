"""Context parallelism on CPU (gloo, 2 processes): exact equivalence with one process, exact byte counts."""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stbench.parallel import context_parallel as cpm
from stbench.parallel import ring
from architectures.attention.dsv import block_mask_to_token_mask, gather_block_sparse_attention
from architectures.attention.full import dense_attention

WORLD = 2
TOL = dict(rtol=1e-9, atol=1e-10)  # fp64 everywhere: a CP step must match one process to rounding


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, fn, out_dir):
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to race for with other test runs on the machine
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        result = fn(rank, world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, tmp_path, world=WORLD) -> list:
    """Run `fn(rank, world)` on `world` gloo processes; returns each rank's JSON-able result. One rank runs in
    this process (a started one would spend seconds importing torch and stbench)."""
    if world == 1:
        _worker(0, 1, fn, str(tmp_path))
    else:
        mp.spawn(_worker, args=(world, fn, str(tmp_path)), nprocs=world, join=True)
    return [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(world)]


def _each(checks: dict, rank, world) -> dict:
    """Several rank functions, one after another in one process group: name -> result."""
    return {name: fn(rank, world) for name, fn in checks.items()}


def ranks_once(checks: dict, tmp_path, world=WORLD) -> dict:
    """`checks` (name -> fn(rank, world)) on one start of `world` ranks (each start imports torch and stbench
    in every rank); name -> each rank's result."""
    results = run_ranks(functools.partial(_each, checks), tmp_path, world=world)
    return {name: [r[name] for r in results] for name in checks}


def _qkv(seed=0, B=2, H=4, N=32, D=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3)]


def _reference(q, k, v, block_mask=None, block_size=1):
    """One-process attention, restricted to the selected (query block, key block) pairs if a mask is given."""
    N = q.shape[2]
    mask = None if block_mask is None else block_mask_to_token_mask(block_mask, block_size, N, N)
    return dense_attention(q, k, v, attn_mask=mask)


def _local(t, rank, world):
    return t.chunk(world, dim=2)[rank].detach().clone().requires_grad_(True)


def _check_grads(full, local_grads, rank, world):
    """Local grads must equal the slices of the single-process gradients."""
    for g_full, g_local in zip(full, local_grads):
        torch.testing.assert_close(g_local, g_full.chunk(world, dim=2)[rank], **TOL)


SIZES = {2: dict(B=2, H=4, N=32, D=8, bs=4), 3: dict(B=1, H=6, N=24, D=8, bs=4)}  # bs: DSV block size
UNEVEN = {2: [[0, 2, 3], [1]], 3: [[0, 2, 3], [1], [4, 5]]}  # head placements with uneven counts


def _attention_functions(rank, world):
    """Ring, Ulysses (even and uneven, non-contiguous placements) and the DSV sparse exchange vs dense."""
    B, H, N, D, bs = SIZES[world].values()
    q, k, v = (t.requires_grad_(True) for t in _qkv(B=B, H=H, N=N, D=D))
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    ref = _reference(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    bytes_seen = {}

    def local_attention(a, b, c, heads):
        return _reference(a, b, c)

    for name, call in {
        "ring": lambda ql, kl, vl, c: ring.ring_attention(ql, kl, vl, counter=c),
        "ulysses": lambda ql, kl, vl, c: cpm.ulysses_attention(ql, kl, vl, local_attention, counter=c),
        "ulysses_uneven": lambda ql, kl, vl, c: cpm.ulysses_attention(ql, kl, vl, local_attention,
                                                                       placement=UNEVEN[world], counter=c),
    }.items():
        counter = cpm.CommCounter()
        ql, kl, vl = (_local(t, rank, world) for t in (q, k, v))
        out = call(ql, kl, vl, counter)
        torch.testing.assert_close(out, ref.chunk(world, dim=2)[rank], **TOL)
        out.backward(dout.chunk(world, dim=2)[rank])
        _check_grads(ref_grads, (ql.grad, kl.grad, vl.grad), rank, world)
        bytes_seen[name] = counter.total

    # DSV sparse exchange: random block selections, top-2 for the first half of the heads, top-3 for the rest
    nq = nkv = N // bs
    scores = torch.rand(B, H, nq, nkv, generator=g)
    topk = torch.tensor([2] * (H // 2) + [3] * (H - H // 2))
    mask = torch.zeros(B, H, nq, nkv, dtype=torch.bool)
    for h in range(H):
        mask[:, h].scatter_(-1, scores[:, h].topk(int(topk[h]), -1).indices, True)
    ref = _reference(q, k, v, mask, bs)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    counter = cpm.CommCounter()
    ql, kl, vl = (_local(t, rank, world) for t in (q, k, v))
    local_mask = mask.chunk(world, dim=2)[rank]
    k_full, v_full = ring.sparse_kv_exchange(kl, vl, local_mask, bs, counter=counter)
    out = gather_block_sparse_attention(ql, k_full, v_full, local_mask, bs, N, D ** -0.5)
    torch.testing.assert_close(out, ref.chunk(world, dim=2)[rank], **TOL)
    out.backward(dout.chunk(world, dim=2)[rank])
    _check_grads(ref_grads, (ql.grad, kl.grad, vl.grad), rank, world)
    bytes_seen["sparse"] = counter.total

    # exact sends: forward the blocks of my shard that other ranks' queries selected, backward the gradients
    # of the blocks I received; plus the need bitmaps (one bool byte per (b, h, kv block)) to each other rank
    def needs(requester, owner):
        return int(mask.chunk(world, dim=2)[requester].any(dim=2).view(B, H, world, -1)[:, :, owner].sum())
    others = [r for r in range(world) if r != rank]
    blocks_moved = sum(needs(o, rank) + needs(rank, o) for o in others)
    bytes_seen["sparse_expected"] = blocks_moved * 2 * bs * D * 8 + B * H * nkv * (world - 1)
    return bytes_seen


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_attention_functions_match_dense_and_count_bytes(world, request):
    B, H, N, D, _ = SIZES[world].values()
    results = request.getfixturevalue("two_ranks" if world == 2 else "three_ranks")["attention"]
    head_shard = B * (N // world) * D * 8  # one head's local (B, n, D) in fp64
    for rank, seen in enumerate(results):
        for mode in ("ring", "ulysses"):
            assert seen[mode] == cpm.analytic_bytes(mode, batch=B, heads=H, tokens=N, head_dim=D, world=world,
                                                    element_size=8), (mode, rank)
        # uneven placement: rank r sends q/k/v of the other ranks' heads (H - c_r) and its own heads' outputs
        # for the other ranks' tokens (c_r (W-1)); backward mirrors both
        mine = len(UNEVEN[world][rank])
        assert seen["ulysses_uneven"] == 4 * ((H - mine) + mine * (world - 1)) * head_shard, rank
        assert seen["sparse"] == seen["sparse_expected"]
        assert seen["sparse"] < seen["ring"]  # same sequence length: only the selected blocks move


MODEL_TOL = dict(rtol=1e-5, atol=1e-7)  # fp64 model; the MSE and DSV's estimator loss are computed in fp32
DSV_SET = dict(block_size=16, sparsity=0.5, dense_steps=1, query_groups="raster")  # 128 tokens: 4 blocks per rank; step 2 is sparse
# 4 heads with a planted uneven profile for the sparse step: heads 0 and 3 sparse (top-1 / top-2 of 8 blocks),
# so head placement is uneven and non-contiguous and per-head top-k differ
DSV_UNEVEN = dict(block_size=16, dense_steps=1, heads=4, head_dim=16, query_groups="raster")
PLANTED = [0.9, 0.0, 0.0, 0.8]
# DSV at its defaults (64-token cube query groups, block_size 64) bar a forced sparsity so step 2 runs sparse:
# 8 frames at 128 px are an (8, 8, 8) grid, one process's 4x4x4 cubes lie inside each rank's 4 frames but are
# not runs of raster order, so each rank must regroup its tokens as one process does
DSV_DEFAULTS = dict(sparsity=0.75, dense_steps=1)


def _model_equivalence(mode, rank, world, frames=8, configs=None, resolution=64):
    """Two training steps of a CP model and of a one-process copy, side by side on every rank."""
    import copy

    import architectures
    from stbench.parallel import make_context_parallel

    summary = {}
    for arch, overrides in configs or (("dit-full", {}), ("dit-dsv", DSV_SET), ("dit-dsv", DSV_UNEVEN)):
        torch.manual_seed(0)
        model = architectures.build(arch, "tiny", **overrides).double().set_training_mode("full")
        batch = model.make_batch(1, frames, resolution, resolution, dtype=torch.float64, seed=3)
        reference = copy.deepcopy(model)
        cp = make_context_parallel(mode).attach(model)
        stepped = {}  # estimator gradients as each layer's own optimizer sees them (Adam would amplify noise)
        for m in (model, reference):
            for i, layer in enumerate(m.dsv_layers()):
                def keep(scale, layer=layer, key=(id(m), i), apply=layer.apply_estimator_step):
                    stepped[key] = (layer.q_estimator.grad.clone(), layer.k_estimator.grad.clone())
                    apply(scale)
                layer.apply_estimator_step = keep
        for step in range(2):  # dit-dsv: step 0 dense + profiling, step 1 block-sparse
            for m in (model, reference):
                m.zero_grad(set_to_none=True)
                if step == 1 and overrides is DSV_UNEVEN:
                    for layer in m.dsv_layers():
                        layer.profiled_sparsity.copy_(torch.tensor(PLANTED))
            torch.manual_seed(10 + step)
            ref_loss = reference.loss(batch)
            ref_loss.backward()
            torch.manual_seed(10 + step)
            cp.counter.reset()
            loss = model.loss(batch)
            loss.backward()
            cp.sync_gradients(model.parameters())
            torch.testing.assert_close(loss, ref_loss, **MODEL_TOL)
            for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
                if name.endswith("_estimator"):  # trained by its own optimizer inside loss(), not by backward
                    continue
                torch.testing.assert_close(p.grad, p_ref.grad, **MODEL_TOL, msg=lambda m: f"{arch} {name}: {m}")
            for i, (a, b) in enumerate(zip(model.dsv_layers(), reference.dsv_layers())):
                assert ((id(model), i) in stepped) == ((id(reference), i) in stepped)
                for g, g_ref in zip(stepped.pop((id(model), i), ()), stepped.pop((id(reference), i), ())):
                    torch.testing.assert_close(g, g_ref, **MODEL_TOL, msg=lambda m: f"{arch} estimator grad: {m}")
                torch.testing.assert_close(a.profiled_sparsity, b.profiled_sparsity, **MODEL_TOL)
                assert torch.equal(a.last_sparse_heads, b.last_sparse_heads)  # all heads, as one process sees
                assert a._last is None  # a training step keeps no q, k, v
            summary[f"{arch}/{step}"] = dict(cp.counter.bytes_by_kind)
        if overrides is DSV_SET:
            summary["sparse_heads"] = [int(m.sparse_heads(8).sum()) for m in model.dsv_layers()]
        if overrides is DSV_DEFAULTS:
            layers = model.dsv_layers()
            summary["defaults"] = dict(sparse_heads=[int(m.last_sparse_heads.sum()) for m in layers],
                                       warnings=[w for m in layers for w in m.warnings],
                                       query_groups=[m.query_groups for m in layers],
                                       orders=[sorted(str(key[0]) for key in m._orders) for m in layers])
        if overrides is DSV_UNEVEN:
            summary["uneven_sparse_heads"] = [m.sparse_heads(8).tolist() for m in model.dsv_layers()]
            summary["uneven_work"] = cp.expected_rank_work()
    return summary


def _ring_dsv_defaults(rank, world):
    return _model_equivalence("ring", rank, world, configs=(("dit-dsv", DSV_DEFAULTS),), resolution=128)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The 2-rank checks (attention functions; model equivalences: ulysses, ring, ring + DSV at its defaults) on
    one start of the ranks."""
    return ranks_once({"attention": _attention_functions,
                       "ulysses": functools.partial(_model_equivalence, "ulysses"),
                       "ring": functools.partial(_model_equivalence, "ring"),
                       "ring_dsv_defaults": _ring_dsv_defaults}, tmp_path_factory.mktemp("two_ranks"))


def test_ring_chunks_run_fused_and_the_formed_fallback_gives_the_same_gradients():
    """A ring chunk runs the device's flash kernel: no (n, m) score matrix is made, forward or backward. The
    fallback that forms scores (fp32 on CUDA) gives the same output, log-sum-exp and per-chunk gradients given the
    merged output and log-sum-exp of two chunks."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    B, H, n, m, D = 1, 2, 48, 40, 8
    g = torch.Generator().manual_seed(3)
    q, k1, k2, v1, v2, dout = (torch.randn(B, H, size, D, generator=g, dtype=torch.float64)
                               for size in (n, m, m, m, m, n))

    def both_chunks(kernel):
        (o1, l1, r1), (o2, l2, r2) = (ring.chunk_attention(q, k, v, 0.3, kernel) for k, v in ((k1, v1), (k2, v2)))
        out, lse = ring.merge_partial(*ring.merge_partial(None, None, o1, l1), o2, l2)
        grads = [ring._chunk_grads(q, k, v, dout, out if kernel is None else out.to(q.dtype), lse, 0.3, kernel, r)
                 for k, v, r in ((k1, v1, r1), (k2, v2, r2))]
        return out, lse, grads

    assert ring._flash_kernel(q, k1, v1) == "cpu"
    with ring.chunks_as_on("cuda"):  # a GPU's step on CPU tensors (predict): flash for fp16/bf16 only
        assert [ring._flash_kernel(t, t, t) for t in (q, q.bfloat16(), q.half(), q[..., :6].bfloat16())] == \
            [None, "cuda", "cuda", None]
    with Largest() as fused_sizes:
        fused = both_chunks("cpu")
    with Largest() as formed_sizes:
        formed = both_chunks(None)
    assert fused_sizes.numel < B * H * n * m <= formed_sizes.numel
    torch.testing.assert_close(fused[:2], formed[:2], **TOL)
    for a, b in zip(fused[2], formed[2]):
        torch.testing.assert_close(a, b, **TOL)
    reference = dense_attention(q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), scale=0.3)
    torch.testing.assert_close(fused[0], reference, **TOL)


def _bf16_chunks_against_dense(device: str) -> str:
    """Two bf16 chunks through the device's kernel (`ring._flash_kernel`), merged, forward and per-chunk backward,
    against fp32 dense attention and its autograd; returns the kernel that ran."""
    B, H, n, D, scale = 1, 4, 256, 64, 0.125
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, 2 * n if i in (1, 2) else n, D, device=device, generator=g)
                     for i in range(4))
    qb, kb, vb, doutb = (t.bfloat16() for t in (q, k, v, dout))
    kernel = ring._flash_kernel(qb, kb[:, :, :n], vb[:, :, :n])
    chunks = [ring.chunk_attention(qb, kb[:, :, s], vb[:, :, s], scale, kernel) for s in (slice(0, n), slice(n, None))]
    out, lse = ring.merge_partial(*ring.merge_partial(None, None, *chunks[0][:2]), *chunks[1][:2])
    o = out if kernel is None else out.to(qb.dtype)
    grads = [ring._chunk_grads(qb, kb[:, :, s], vb[:, :, s], doutb, o, lse, scale, kernel, chunk[2])
             for s, chunk in zip((slice(0, n), slice(n, None)), chunks)]
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    reference = dense_attention(q, k, v, scale=scale)
    reference.backward(dout)
    tol = dict(rtol=3e-2, atol=3e-2)  # bf16 products against fp32
    torch.testing.assert_close(out.float(), reference.detach(), **tol)
    torch.testing.assert_close(grads[0][0] + grads[1][0], q.grad, **tol)
    for i, full in ((1, k.grad), (2, v.grad)):
        torch.testing.assert_close(torch.cat([grads[0][i], grads[1][i]], 2), full, **tol)
    return kernel


def test_bf16_ring_chunks_match_dense_attention_on_the_cpu():
    assert _bf16_chunks_against_dense("cpu") == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_ring_chunks_run_flash_attention_2_and_match_dense_attention_on_cuda():
    assert _bf16_chunks_against_dense("cuda") == "cuda"  # FlashAttention-2's forward and backward, by name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_context_parallel_step_equals_single_process(mode, two_ranks):
    results = two_ranks[mode]
    assert results[0]["sparse_heads"] == [2, 2]  # the second step really ran block-sparse
    assert results[0]["uneven_sparse_heads"] == [[True, False, False, True]] * 2
    # expected per-rank work (2 layers): ulysses places heads by LPT: {1, 3} and {0, 2} -> 1.25 and 1.125
    # dense-equivalent heads per layer; ring splits every head's queries evenly
    expected = [2.5, 2.25] if mode == "ulysses" else [(0.125 + 1 + 1 + 0.25)] * 2
    assert results[0]["uneven_work"] == pytest.approx(expected)
    # dit-full tiny: 2 layers, 2 heads of 32, hidden 64, 128 tokens, fp64: every byte accounted for
    import architectures
    model = architectures.build("dit-full", "tiny")
    grads = sum(p.numel() for p in model.parameters()) * 8
    for sent in results:
        assert sent["dit-full/1"] == {
            "attention": 2 * cpm.analytic_bytes(mode, batch=1, heads=2, tokens=128, head_dim=32, world=WORLD,
                                                element_size=8),
            "tokens": (WORLD - 1) * 1 * (128 // WORLD) * 64 * 8,
            "grad_sync": grads * 2 * (WORLD - 1) // WORLD}


@pytest.mark.slow
def test_ring_dsv_at_its_defaults_equals_single_process(two_ranks):
    """Ring + DSV with cube query groups (the default): loss, gradients, estimator gradients and profiles equal
    one process's (asserted on every rank inside), the sparse step ran sparse, and no note says otherwise."""
    results = two_ranks["ring_dsv_defaults"]
    for r in results:
        assert r["defaults"]["query_groups"] == ["cube", "cube"]
        assert r["defaults"]["sparse_heads"] == [2, 2]  # step 2: every head block-sparse (top-2 of 8 blocks)
        assert r["defaults"]["warnings"] == []
        assert r["defaults"]["orders"] == [["(8, 8, 8)", "ring"], ["(8, 8, 8)", "ring"]]  # cube order built, used
        assert r["dit-dsv/1"]["attention"] > 0


def test_ring_dsv_cubes_that_span_ranks_are_chosen_per_rank_and_noted():
    """4 frames over 2 ranks: one process's 4x4x4 cubes would span both ranks; each rank groups its own 2 frames
    into cubes of 64 tokens (a permutation of its tokens) and the record's warnings say so. With no cube of 64
    inside a rank's tokens, raster order runs, also noted."""
    from architectures.attention.dsv import DSVAttention

    for rank in range(2):
        cp = object.__new__(ring.RingParallel)
        cp.rank, cp.world = rank, 2
        attn = DSVAttention(64, 2, 32, query_groups="cube")
        attn.grid = (4, 8, 8)
        perm, inverse = cp._query_group_order(attn, 128, torch.device("cpu"))
        assert sorted(perm.tolist()) == list(range(128)) and perm.tolist() != list(range(128))
        assert torch.equal(perm[inverse], torch.arange(128))
        assert attn.warnings == ["ring context parallelism: query groups are 2x4x8 cubes inside each rank's 2 "
                                 "frames; one process's 4x4x4 cubes span ranks (--context-parallel ulysses keeps "
                                 "them)"]
        attn = DSVAttention(64, 2, 32, query_groups="cube")
        attn.grid = (2, 8, 8)  # one frame per rank: no 64-token cube of (1, 8, 8) but the frame itself
        perm, _ = cp._query_group_order(attn, 64, torch.device("cpu"))
        assert perm.tolist() == list(range(64))
        attn = DSVAttention(64, 2, 32, block_size=16, query_groups="cube")
        attn.grid = (2, 4, 6)  # 24 tokens per rank: cubes of 16 of the 2x4x6 grid span ranks; none fits (1, 4, 6)
        assert cp._query_group_order(attn, 24, torch.device("cpu")) is None
        assert "raster query groups run" in attn.warnings[-1]


def _model_equivalence_kw(mode, frames, rank, world):  # 6 frames: 96 tokens, 2 DSV blocks per rank
    return _model_equivalence(mode, rank, world, frames=frames,
                              configs=(("dit-full", {}), ("dit-dsv", DSV_SET)))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    """The 3-rank checks (attention functions; ulysses with a rank holding no head) on one start of the ranks."""
    return ranks_once({"attention": _attention_functions,
                       "no_heads": functools.partial(_model_equivalence_kw, "ulysses", 6)},
                      tmp_path_factory.mktemp("three_ranks"), world=3)


@pytest.mark.slow
def test_ulysses_with_a_rank_holding_no_heads(three_ranks):
    """3 ranks, 2 heads: one rank holds no head yet joins every collective (forward and backward)."""
    results = three_ranks["no_heads"]
    assert all(r["sparse_heads"] == [2, 2] for r in results)


def _launch_ranks(tmp_path, extra_env, world=WORLD, timeout=90):
    """`python -m stbench run --context-parallel ulysses` on `world` processes wired as torchrun would."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **extra_env}
        cmd = [sys.executable, str(Path(__file__).parent / "fixtures" / "failing_rank.py"), "run", "--arch", "dit-full", "--device", "cpu", "--repeats", "2",
               "--context-parallel", "ulysses", "--no-progress", "--out", str(tmp_path / "run")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    start = time.monotonic()
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], [err for _, err in outputs], time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "exit", "hang"])
def test_failed_rank_ends_the_run_on_every_rank(how, tmp_path):
    """Rank 1 raises (its error reaches every rank through the store), dies silently (rank 0's collective
    fails: closed connection) or hangs (rank 0's collective times out after STBENCH_DIST_TIMEOUT, and its
    error ends rank 1): every process exits non-zero with a clear line, none hangs."""
    timeout_s = 6
    codes, errs, elapsed = _launch_ranks(tmp_path, {"STBENCH_TEST_FAIL_RANK": f"1:{how}",
                                                    "STBENCH_DIST_TIMEOUT": str(timeout_s)})
    assert all(code != 0 for code in codes), (codes, errs)
    assert elapsed < 60
    if how == "raise":
        for err in errs:  # every rank names the failing rank, the case and the error
            assert "stbench: error: rank 1 failed in case dit-full-tiny" in err and "injected failure" in err, err
    elif how == "exit":
        assert "stbench: error: rank 0 failed in case dit-full-tiny" in errs[0]
        assert "one may have died" in errs[0]
    else:
        for err in errs:
            assert "stbench: error: rank 0 failed in case dit-full-tiny" in err, err
    from stbench import results
    records = results.read_records(tmp_path / "run")
    assert len(records) == 1 and records[0]["status"] == "error" and records[0]["world_size"] == WORLD
    assert "failed in case" in records[0]["error"]


def test_lpt_head_placement_beats_round_robin_on_uneven_sparsity():
    """A DSV layer with a planted profile: dense heads 0, 1 and 6, the others 90% sparse."""
    from architectures.attention.dsv import DSVAttention

    attn = DSVAttention(64, 8, 8, block_size=16)
    attn.profiled_sparsity.copy_(torch.tensor([0.0, 0.0, 0.9, 0.9, 0.9, 0.9, 0.0, 0.9]))
    attn.profile_updates += 1
    attn.sparse_active = True
    work = cpm.dsv_head_work(attn, tokens=160)  # 10 kv blocks: sparse heads keep 1 -> work 0.1
    assert work == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 1.0, 0.1])
    balanced = cpm.balance_heads(work, 2)
    round_robin = cpm.round_robin_heads(8, 2)
    assert sorted(h for heads in balanced for h in heads) == list(range(8))
    assert max(cpm.rank_work(round_robin, work)) == pytest.approx(2.2)  # heads 0, 2, 4, 6
    assert max(cpm.rank_work(balanced, work)) == pytest.approx(2.0)  # two dense heads vs one + five sparse
    assert max(cpm.rank_work(balanced, work)) < max(cpm.rank_work(round_robin, work))
    # equal work: LPT is an even split
    assert [len(h) for h in cpm.balance_heads([1.0] * 6, 3)] == [2, 2, 2]


@pytest.mark.parametrize("argv, message", [
    (["--arch", "dit-window", "--context-parallel", "ring"], "ring context parallelism supports full and dsv "
                                                             "self-attention, not attention 'window'; use ulysses"),
    (["--arch", "dit-serial-st", "--context-parallel", "ring"], "not attention 'serial'; use ulysses"),
    (["--arch", "wan", "--mode", "full", "--frames", "29", "--set", "attention=window", "--context-parallel", "ring"],
     "not attention 'window'; use ulysses"),
    (["--arch", "dit-dsv", "--frames", "4", "--context-parallel", "ring"],
     "ring + dsv: 32 tokens per rank is not a multiple of block_size 64; pick frames/resolution with whole "
     "blocks per rank, or --set block_size=..."),
    (["--arch", "dit-dsv", "--fsdp", "2", "--context-parallel", "ring"],
     "DSV attention with --fsdp and --context-parallel together is not supported"),
    (["--arch", "wan", "--mode", "full", "--frames", "29", "--set", "attention=dsv", "--fsdp", "2",
      "--context-parallel", "ulysses"], "DSV attention with --fsdp and --context-parallel together"),
])
def test_combinations_that_cannot_run_are_refused_before_any_process_group(argv, message, tmp_path, capsys,
                                                                          monkeypatch):
    """Under torchrun (WORLD_SIZE set) these end with one line and exit 2 before a process group is made; no
    rendezvous is reachable here, so reaching init_process_group would fail differently."""
    from stbench.cli import main

    world = "4" if "--fsdp" in argv else "2"
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens: a process group could not form
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("process group made"))
    assert main(["run", *argv, "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stbench: error: --fsdp/--context-parallel for ") and message in err
    assert not (tmp_path / "run").exists()

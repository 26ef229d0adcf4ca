"""DSV's GPU-path guarantees and the paper's mechanisms, each against a reference (CPU)."""
import functools
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import architectures
from architectures.attention import dsv, sparse
from architectures.attention import DSVAttention, CostTable, block_mask_to_token_mask, dense_attention
from stbench.measure import flops, memory


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def sparse_layer(heads=2, head_dim=16, block=16, sparsity=0.75, **kw):
    layer = DSVAttention(heads * head_dim, heads, head_dim, block_size=block, sparsity=sparsity, **kw).double()
    layer.sparse_active = True
    return layer


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile as on CUDA but with dynamo's aot_eager backend: FlexAttention's forward runs on CPU."""
    from architectures.attention import flex

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.setattr(flex, "_compiled_flex", None)
    yield
    torch._dynamo.reset()


# --- defects of the GPU path --------------------------------------------------------------------------

def test_flop_pass_leaves_flex_in_use_and_counts_the_computed_tiles(aot_eager):
    layer = sparse_layer(backend="flex").float().eval()
    q, k, v = (rand(1, 2, 256, 16, seed=s).float() for s in range(3))  # 16 blocks of 16, 4 kept per row
    with torch.no_grad():
        before = layer.core(q, k, v)
        counted = flops.count_flops(lambda: layer.core(q, k, v))
        after = layer.core(q, k, v)
    assert layer.backend_ran == "flex" and layer.warnings == [] and not layer._flex_failed
    torch.testing.assert_close(after, before)
    tiles = 2 * 16 * 4  # heads x query blocks x kept key blocks
    estimator = 2 * (2 * 2 * 256 * 16 * 16)  # the two low-rank projections (einsum -> bmm), rank 16
    scores = 2 * 16 * 256 * 16 * 2  # pooled low-rank queries (16 per head) x 256 keys x rank 16
    assert counted == sparse.tile_flops(tiles, 16, 16, 16)[0] + estimator + scores


def test_injected_kernel_failure_is_a_warning_of_its_layer_and_oom_stays_oom(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("triton: no valid kernel config")

    monkeypatch.setattr(sparse, "flex_available", lambda device: True)
    monkeypatch.setattr(sparse, "flex_block_sparse_attention", broken)
    layer = sparse_layer()
    q, k, v = (rand(1, 2, 64, 16, seed=s).requires_grad_() for s in range(3))
    out = layer.core(q, k, v)
    out.sum().backward()
    assert layer.backend_ran == "gather" and "FlexAttention failed (RuntimeError: triton" in layer.warnings[0]
    assert sparse_layer()._backend(q.device) == "flex"  # no process-wide flag: a new model starts on flex again

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")

    monkeypatch.setattr(sparse, "flex_block_sparse_attention", oom)
    with pytest.raises(RuntimeError) as caught:
        sparse_layer().core(q, k, v)
    assert memory.is_out_of_memory(caught.value)


@pytest.mark.parametrize("message", ["CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate",
                                     "cuDNN error: CUDNN_STATUS_ALLOC_FAILED", "CUDA out of memory. Tried to allocate"])
def test_every_cuda_flavour_of_out_of_memory_is_recognised_also_wrapped(message):
    try:
        try:
            raise RuntimeError(message)
        except RuntimeError as inner:
            raise ValueError("backend compiler failed") from inner
    except ValueError as wrapped:
        assert memory.is_out_of_memory(wrapped)
    assert not memory.is_out_of_memory(RuntimeError("shape mismatch"))


def test_runner_records_a_fallback_in_the_case_warnings_and_the_case_stays_ok(monkeypatch):
    from stbench.config import Case
    from stbench.runner import run_case

    def broken(*args, **kwargs):
        raise RuntimeError("injected kernel failure")

    monkeypatch.setattr(sparse, "flex_available", lambda device: True)
    monkeypatch.setattr(sparse, "flex_block_sparse_attention", broken)
    case = Case(arch="dit-dsv", preset="tiny", mode="temporal", resolution=64, frames=4, batch=1, dtype="fp32",
                device="cpu", overrides=(("sparsity", "0.75"), ("dense_steps", "0"), ("block_size", "16")))
    record = run_case(case, repeats=2, warmup=2)
    assert record["status"] == "ok", record.get("error")
    assert any("injected kernel failure" in w for w in record["warnings"])
    assert any("sparsity forced to 0.75" in w for w in record["warnings"])
    d = record["dsv"]
    assert d["backend"] == "gather" and d["forced"] is True and d["switch_step"] == 0
    assert d["computed_fraction"] == pytest.approx(0.25)  # 64 tokens = 4 blocks of 16, 1 kept per row, all heads


def test_computed_tiles_are_exact_on_a_planted_mask():
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[0, 0, :, 0] = True  # head 0: one block per row
    mask[0, 1, :, :3] = True  # head 1: three blocks per row
    assert sparse.computed_tiles("flex", [1, 3], 4, 1) == int(mask.sum()) == 16
    assert sparse.computed_tiles("gather", [1, 3], 4, 1) == 24  # rows padded to the longest (3 slots each)
    model = architectures.build("dit-dsv", "tiny", sparsity=0.5, dense_steps=0, block_size=16)
    model.warmup_steps(1)
    batch = model.make_batch(1, 4, 64, 64)  # 64 tokens: 4 blocks, 2 kept per row in every head
    for _ in range(3):
        model.loss(batch).backward()
    assert model.dsv_stats()["computed_fraction"] == 0.5


class SyncCounter(TorchDispatchMode):
    """Counts operators that read device data on the host (a CUDA synchronisation each)."""

    SYNCS = {"_local_scalar_dense", "nonzero", "is_nonzero", "item", "equal", "_assert_async"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", [dict(sparsity=0.75), dict(sparsity_threshold=0.0, mass_coverage=0.3, query_groups="raster"),
                                       dict(sparsity=0.75, key_selection="token")])
def test_no_host_synchronisation_inside_the_sparse_stage(overrides):
    model = architectures.build("dit-dsv", "tiny", dense_steps=1, block_size=16, reprofile_interval=0, **overrides)
    batch = model.make_batch(1, 4, 64, 64)
    for _ in range(2):  # stage 1 (dense, profiling) and the first sparse step (builds the plan)
        model.loss(batch).backward()
    with SyncCounter() as counter:
        model.loss(batch).backward()
    assert all(layer.last_sparse_heads.any() for layer in model.dsv_layers())
    assert counter.seen == []


def test_a_compiled_traced_case_says_its_regions_are_not_captured(toy_case, monkeypatch, tmp_path):
    from stbench.runner import run_case

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the record's words, not the compiler, matter
    record = run_case(toy_case(compile=True), repeats=1, warmup=1, trace_dir=tmp_path)
    assert record["status"] == "ok", record.get("error")
    assert any("record_function regions inside the torch.compile'd graph are not captured" in w
               for w in record["warnings"])


# --- the paper's mechanisms ----------------------------------------------------------------------------

def test_stage_switch_when_the_estimator_loss_is_low_with_dense_steps_as_the_cap():
    batch = None
    for switch_loss, expected in ((100.0, (1, "estimator loss")), (0.0, (3, "dense_steps"))):
        model = architectures.build("dit-dsv", "tiny", dense_steps=3, switch_loss=switch_loss, block_size=16)
        batch = batch or model.make_batch(1, 4, 64, 64)
        for _ in range(4):
            model.loss(batch).backward()
        assert (model.switch_step, model.switch_reason) == expected


def test_stage_two_reprofiles_at_low_frequency_and_fine_tunes_at_a_reduced_lr():
    model = architectures.build("dit-dsv", "tiny", dense_steps=1, block_size=16, sparsity_threshold=0.0,
                                reprofile_interval=2, finetune_lr_scale=0.1, estimator_lr=1e-3)
    batch = model.make_batch(1, 4, 64, 64)
    layer = model.dsv_layers()[0]
    updates = []
    for _ in range(6):
        model.loss(batch).backward()
        updates.append(int(layer.profile_updates))
    assert updates == [1, 1, 1, 2, 2, 3]  # stage 1 at step 0; switch at step 1; re-profiles at steps 3 and 5
    assert layer.estimator_optimizer().param_groups[0]["lr"] == pytest.approx(1e-4)


def test_cube_order_groups_3d_cubes_like_a_loop_reference():
    grid, shape = (4, 4, 6), (2, 2, 3)
    order = dsv.cube_order(grid, shape).tolist()
    reference = [(f * 4 + r) * 6 + c for F in range(2) for R in range(2) for C in range(2)
                 for f in range(F * 2, F * 2 + 2) for r in range(R * 2, R * 2 + 2) for c in range(C * 3, C * 3 + 3)]
    assert order == reference
    assert dsv.cube_shape((16, 16, 16), 64) == (4, 4, 4) and dsv.cube_shape((2, 4, 4), 32) == (2, 4, 4)
    assert dsv.cube_shape((3, 5, 7), 64) is None


def test_cube_groups_equal_dense_attention_restricted_to_the_selected_cubes():
    layer = sparse_layer(sparsity=0.5, query_groups="cube")
    layer.grid = (4, 4, 4)  # 64 tokens: cubes of 2x2x4 = 16
    q, k, v = (rand(1, 2, 64, 16, seed=s).requires_grad_() for s in range(3))
    out = layer.core(q, k, v)
    perm, inverse = layer._order(64, q.device)
    with torch.no_grad():
        qe, ke = layer.estimate(q[:, :, perm], k[:, :, perm], slice(0, 2))
        mask = dsv.select_blocks(dsv.estimate_block_scores(qe, ke, 16, 0.25), 2)
    cube_mask = block_mask_to_token_mask(mask, 16, 64, 64)[..., inverse, :][..., inverse]  # back to raster
    torch.testing.assert_close(out, dense_attention(q, k, v, attn_mask=cube_mask))
    assert layer.backend_ran == "gather"


def test_token_level_key_selection_equals_dense_attention_on_the_same_keys():
    layer = sparse_layer(sparsity=0.75, key_selection="token")
    q, k, v = (rand(1, 2, 64, 16, seed=s).requires_grad_() for s in range(3))
    out = layer.core(q, k, v)
    with torch.no_grad():
        qe, ke = layer.estimate(q, k, slice(0, 2))
        keys = dsv.select_key_tokens(dsv.pooled_key_probs(qe, ke, 16, 0.25), 16)  # (1, 2, 4, 16)
    allowed = torch.zeros(1, 2, 4, 64, dtype=torch.bool).scatter_(-1, keys, True).repeat_interleave(16, -2)
    ref = dense_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(out, ref)
    gq = torch.autograd.grad(out.sum(), (q, k, v))
    gr = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(gq, gr):
        torch.testing.assert_close(a, b)
    assert not torch.equal(allowed[..., ::16, :].view(1, 2, 4, 4, 16).any(-1).sum(-1), torch.full((1, 2, 4), 1))


def test_dispatcher_goes_sparse_only_where_the_cost_table_says_it_is_faster(tmp_path):
    table = tmp_path / "results.jsonl"
    rows = [dict(status="ok", attention=dict(backend="gather", tokens=64, sparsity=s, speedup=x))
            for s, x in ((0.5, 0.8), (0.9, 2.0))]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cost = CostTable.from_file(tmp_path)
    assert cost.speedup("gather", 60, 0.7) == pytest.approx(1.4) and cost.speedup("flex", 64, 0.7) is None
    for sparsity, goes_sparse in ((0.5, False), (0.75, True)):
        layer = sparse_layer(sparsity=sparsity, cost_table=cost)
        q, k, v = (rand(1, 2, 64, 16, seed=s) for s in range(3))
        out = layer.core(q, k, v)
        assert bool(layer.last_sparse_heads.any()) is goes_sparse and layer.vetoed is not goes_sparse
        if not goes_sparse:
            torch.testing.assert_close(out, dense_attention(q, k, v))


def test_one_cost_table_per_file_read_again_when_rewritten(tmp_path):
    """Layers share one read of the table; a folder names its results.jsonl, whose rewrite is seen."""
    from architectures.attention.dsv_stages import _cost_table

    table = tmp_path / "results.jsonl"
    row = dict(status="ok", attention=dict(backend="gather", tokens=64, sparsity=0.5, speedup=2.0))
    table.write_text(json.dumps(row) + "\n")
    first = _cost_table(str(tmp_path))
    assert _cost_table(str(table)) is first and first.speedup("gather", 64, 0.5) == 2.0
    row["attention"]["speedup"] = 0.25
    table.write_text(json.dumps(row) + "\n")
    os.utime(table, ns=(table.stat().st_atime_ns, table.stat().st_mtime_ns + 1))  # a coarse clock: mtime moves
    assert _cost_table(str(tmp_path)).speedup("gather", 64, 0.5) == 0.25


def plant_local_attention(model, sharpness=8.0):
    """Weights whose self-attention is local (structured): x = the 3D position embedding, q = k = scaled x."""
    C, heads, D = model.config.hidden_size, model.config.heads, model.config.head_dim
    with torch.no_grad():
        model.patch_embed.weight.zero_()
        model.patch_embed.bias.zero_()
        for block in model.blocks:
            w = block.attn.qkv.weight  # (3 H D, C)
            w.zero_()
            eye = torch.eye(heads * D, C) * sharpness
            w[: heads * D] = eye  # queries
            w[heads * D: 2 * heads * D] = eye  # keys


def test_defaults_learn_sparsity_where_attention_is_structured_and_not_where_it_is_not():
    results = {}
    for planted in (True, False):
        torch.manual_seed(0)
        # defaults (profiled sparsity, cubes of 64 tokens, switch below an estimator loss of 0.01), with room to
        # get there: the switch comes from the estimator's loss, not the dense_steps cap
        model = architectures.build("dit-dsv", "tiny", dense_steps=20)
        if planted:
            plant_local_attention(model)
        batch = model.make_batch(1, 8, 128, 128)  # 8 x 8 x 8 = 512 tokens: 8 cubes of 4x4x4
        for _ in range(model.warmup_steps(2) + 1):
            model.loss(batch).backward()
        results[planted] = model.extra_stats()
    learned, flat = results[True]["dsv"], results[False]["dsv"]
    assert learned["forced"] is False and learned["switch_reason"] == "estimator loss"
    assert learned["sparse_head_fraction"] == 1.0 and min(learned["layer_sparsity"]) >= 0.5
    assert learned["estimator_recall"] > 0.75 and learned["computed_fraction"] < 0.5
    assert not any("forced" in w for w in results[True]["warnings"])
    assert flat["sparse_head_fraction"] == 0.0 and flat["computed_fraction"] == 1.0  # random weights: dense

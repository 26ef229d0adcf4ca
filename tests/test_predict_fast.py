"""Repeated blocks traced once (stbench/predict/blocks.py) against the whole trace (`--exact`): the same bytes,
FLOPs and collectives, and step times within 0.1%, for every family, regime and layout; and the fallback."""
from __future__ import annotations

import gc
import random

import pytest
from torch import nn

from stbench.config import Case
from stbench.predict import blocks, estimate, fake, hardware, memory

H100 = hardware.get("h100-sxm")
EXACT_FIELDS = ("peak_bytes", "fits", "flops", "breakdown", "peak_allocated_bytes", "allocated_after_step_bytes",
                "reserved_bytes", "kernels")
TIMES = ("step_ms", "step_ms_bound", "compute_ms", "memory_ms", "comm_ms")
TRACE_FIELDS = ("params_total", "params_trainable", "param_bytes", "grad_bytes", "optimizer_bytes",
                "saved_activations", "comm")


def case(arch, frames, resolution, depth, mode="full", **fields) -> Case:
    """A tiny case whose block lists have 6 members (the fewest that are cut: first, three inner, last, and
    one spliced in)."""
    overrides = tuple((name, str(depth)) for name in (("depth",) if arch.startswith("dit") else depth_fields(arch)))
    overrides += tuple(fields.pop("overrides", ()))
    return Case(arch=arch, preset="tiny", mode=mode, frames=frames, resolution=resolution, dtype="bf16",
                device="cpu", overrides=overrides, **fields)


def depth_fields(arch: str) -> tuple[str, ...]:
    if arch == "hunyuan-video":
        return ("num_layers", "num_single_layers")
    return () if arch.endswith("unet") else ("num_layers",)


def fsdp(**fields) -> dict:
    return {"activation_checkpointing": "none", "fsdp_reshard_after_forward": True, "fsdp_mixed_precision": False,
            **fields}


def assert_same(c: Case, world: int = 1, target=H100, expect_reuse: bool = True) -> fake.StepTrace:
    foreach = estimate.foreach_for(target)
    whole = estimate.cached_trace(c, foreach, world, True)  # positional, as predict_case calls it (one cache)
    spliced = estimate.cached_trace(c, foreach, world, False)
    if expect_reuse:
        assert spliced.reuse and spliced.refused is None, spliced.refused
    a, b = estimate.prediction(whole, target), estimate.prediction(spliced, target)
    for name in EXACT_FIELDS:
        assert a[name] == b[name], name
    for name in TIMES:
        if a.get(name) is not None:
            assert b[name] == pytest.approx(a[name], rel=1e-3), name
    for name in TRACE_FIELDS:
        assert getattr(whole, name) == getattr(spliced, name), name
    assert len(whole.events) == len(spliced.events) and len(whole.ops) == len(spliced.ops)
    return spliced


@pytest.mark.parametrize("arch,frames,resolution,mode,fields", [
    ("wan", 5, 32, "full", dict(lora=4, param_dtype="bf16", encoders="resident")),  # a LoRA fine-tune's regime
    ("cogvideox", 5, 32, "full", dict(activation_checkpointing="blocks", optimizer="adamw8bit")),
    ("hunyuan-video", 5, 32, "full", dict(overrides=(("num_layers", "1"),))),  # only the single-stream list
    ("ltx-video", 9, 32, "full", {}),
    ("latte", 2, 32, "temporal", dict(overrides=(("video_length", "2"),))),  # spatial and temporal lists in step
    ("mochi", 7, 32, "full", {}),  # its last block differs (context_pre_only): kept, never copied
    ("dit-dsv", 2, 32, "full", dict(overrides=(("sparsity", "0.5"), ("dense_steps", "0")))),  # estimator steps
    ("dit-serial-st", 2, 32, "temporal", dict(activation_checkpointing="spatial")),
    ("dit-full", 2, 32, "full", dict(overrides=(("depth", "9"),))),  # four copies: copies free each other's
], ids=["wan-lora-bf16-encoders", "cogvideox-checkpointing-8bit", "hunyuan-video", "ltx-video", "latte",
        "mochi", "dit-dsv", "dit-serial-st-spatial", "dit-full"])
def test_spliced_trace_equals_the_whole_trace_for_every_family(arch, frames, resolution, mode, fields):
    trace = assert_same(case(arch, frames, resolution, 6, mode, **fields))
    assert trace.reuse and all(n in (6, 9) and traced == blocks.KEPT for n, traced in trace.reuse.values())


def test_a_unet_has_no_repeated_list_and_the_host_heap_splices_too():
    for arch in ("serial-unet", "mobius-unet", "mobius-ladder-unet"):  # down/up blocks differ: traced whole
        assert blocks.cut(case(arch, 2, 32, 0, "temporal").build_model("meta")) is None
    cpu = Case(arch="dit-full", preset="tiny", mode="full", frames=2, resolution=32, device="cpu",
               overrides=(("depth", "6"),))  # fp32, AdamW's per-parameter loop, glibc's heap
    assert_same(cpu, target=hardware.get("cpu"))


@pytest.mark.parametrize("fields", [
    fsdp(fsdp=4, activation_checkpointing="blocks"), fsdp(fsdp=2, context_parallel="ulysses"),
    fsdp(fsdp=2, context_parallel="ring")], ids=["fsdp-checkpointing", "ulysses", "ring"])
def test_spliced_trace_equals_the_whole_trace_on_a_fake_process_group(fields):
    depth = 7 if fields["fsdp"] == 4 else 6  # two copies: the copies gather and free each other's shards
    trace = assert_same(case("dit-full", 2, 32, depth, **fields), world=4)
    assert trace.comm  # the collectives of the spliced blocks are counted


def test_only_lists_of_alike_untied_inner_members_are_cut():
    alike = nn.Sequential(nn.ModuleList(nn.Linear(8, 8) for _ in range(7)))
    cut = blocks.cut(alike)
    assert cut.lists == (("0", 7),) and len(alike[0]) == blocks.KEPT and cut.copies == {7: 2}
    assert [owner for _, owner in cut.members] == [(7, p) for p in range(blocks.KEPT)]
    shaped = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)] + [nn.Linear(8, 4)] +
                           [nn.Linear(4, 4) for _ in range(3)])
    told = nn.ModuleList(nn.Linear(8, 8) for _ in range(7))
    told[3].index = 3  # a block told something the others are not
    tied = nn.ModuleList(nn.Linear(8, 8) for _ in range(7))
    for m in tied[1:]:
        m.weight = tied[0].weight  # one weight for every block: counted once, not once per copy
    for blocks_list in (shaped, told, tied):
        assert blocks.cut(nn.Sequential(blocks_list)) is None and len(blocks_list) == 7


def test_blocks_alike_in_shape_but_not_in_behaviour_are_traced_whole(monkeypatch):
    from architectures.dit import DiTBlock

    original_cut, original_forward = blocks.cut, DiTBlock.forward

    def cut(model):
        found = original_cut(model)
        found.members[3][0].planted = True  # one inner block does more than the others
        return found

    def forward(self, x, *args, **kwargs):
        out = original_forward(self, x, *args, **kwargs)
        return out * 1.0 if getattr(self, "planted", False) else out

    monkeypatch.setattr(blocks, "cut", cut)
    monkeypatch.setattr(DiTBlock, "forward", forward)
    trace = fake.trace_step(case("dit-full", 2, 32, 6))
    assert trace.reuse == {} and "inner blocks of the 6-block list" in trace.refused


def test_a_model_that_fails_once_cut_is_traced_whole(monkeypatch):
    # (blocks that do not repeat fall back the same way: test_blocks_alike_in_shape_but_not_in_behaviour...)
    def fail(*_):
        raise IndexError("index 10 is out of range")  # e.g. a model indexing a block the cut removed

    estimate.cached_trace.cache_clear()  # not the trace an earlier test cached
    monkeypatch.setattr(blocks, "splice", fail)
    record = estimate.predict_case(case("dit-full", 2, 16, 6), H100)
    assert record["status"] == "ok"
    assert record["predicted"]["trace"] == {
        "exact": True, "refused": "the cut model failed (IndexError: index 10 is out of range)"}


def test_a_user_model_is_traced_whole():
    trace = fake.trace_step(Case(arch="examples.my_video_model:build", preset="tiny", mode="full", frames=5,
                                 resolution=32, device="cpu"))
    assert trace.reuse == {} and trace.refused == "a user model is traced whole"


def test_frees_in_any_order_leave_every_replayed_figure_unchanged():
    # the splice puts runs of frees in a canonical order: the allocator models must not depend on it
    rng = random.Random(0)
    events, live, key = [], [], 0
    for _ in range(400):
        if live and rng.random() < 0.45:
            batch = rng.sample(live, rng.randint(1, min(6, len(live))))
            events.append(("free", batch))
            live = [k for k in live if k not in batch]
        else:
            events.append(("malloc", (key, rng.choice((512, 4096, 1 << 20, 3 << 20, 12 << 20)))))
            live.append(key)
            key += 1
    sizes = {k: n for kind, v in events if kind == "malloc" for k, n in [v]}

    def flat(shuffle: bool) -> list:
        out = []
        for kind, v in events:
            if kind == "malloc":
                out.append((1, v[0], v[1]))
            else:
                batch = list(v)
                if shuffle:
                    rng.shuffle(batch)
                out.extend((-1, k, sizes[k]) for k in batch)
        return out

    for caching in (True, False):
        reference = memory.replay(flat(False), caching=caching, capacity=200 << 20, at=300)
        for _ in range(3):
            assert memory.replay(flat(True), caching=caching, capacity=200 << 20, at=300) == reference


def test_predict_records_how_the_step_was_traced():
    c = case("dit-full", 2, 32, 6)  # traced above (estimate.cached_trace)
    spliced = estimate.predict_case(c, H100)["predicted"]["trace"]
    assert spliced == {"exact": False, "repeated": {"blocks": {"blocks": 6, "traced": blocks.KEPT}}}
    assert estimate.predict_case(c, H100, exact=True)["predicted"]["trace"] == {"exact": True}


def test_a_fake_step_records_the_same_with_the_collector_running(monkeypatch):
    """trace_step pauses the garbage collector (its frees are refcounts', seen by finalizers): with a full
    collection every 250 allocations, the same allocations and frees are recorded in the same order."""
    c = case("wan", 1, 32, 6, activation_checkpointing="blocks")
    paused = fake.trace_step(c)
    allocate, passes = fake._Tracker._allocate, []

    def collecting_allocate(self, *args, **kwargs):
        if self.next_key % 250 == 0:
            passes.append(gc.collect())
        return allocate(self, *args, **kwargs)

    monkeypatch.setattr(fake._Tracker, "_allocate", collecting_allocate)
    collecting = fake._traced(c, True, 2, 1, False)
    assert len(passes) > 10 and sum(passes) > 0  # collections ran, and found cyclic garbage (not storages)
    assert collecting.events == paused.events

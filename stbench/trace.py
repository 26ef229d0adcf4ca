"""Kernel traces of real training steps (torch.profiler) and a per-region time breakdown read from them.

`profile_training_steps` writes the trace in the layout torch-tb-profiler reads
(`OUT/<worker>.<ns>.pt.trace.json`, also opened by ui.perfetto.dev) and a `summary.json` beside it.
`summarize_trace` reads any such Chrome trace; it is pure Python, so CUDA traces can be tested on CPU.

How time is attributed to a region (a `record_function` range such as `spatial`):
* `range_ms`: CPU wall of the region's ranges (outermost occurrence only, so a region nested in itself
  counts once). This is the forward pass of a model region and the whole optimizer step of `optimizer`.
* `backward_ms`: CPU wall of the autograd nodes (`autograd::engine::evaluate_function: ...`) whose forward
  op ran inside the region, matched by autograd sequence number: backward runs outside the ranges.
* `gpu_ms` (CUDA only): device time of kernels, memcpys and memsets launched inside the region's ranges
  or by its backward nodes (the launch is found through the kernel's correlation id).
* `*_self_ms`: the same with time inside a nested tracked region left to that region (exclusive).
`forward` and `backward` may themselves be annotated by the step; backward nodes always count as `backward`.
All times are milliseconds per step: totals over the `active` profiled steps divided by their number.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

SUMMARY_FILE = "summary.json"
PROFILER_LOG = "profiler.log"  # the profiler's own stderr notices, kept out of the terminal
SUMMARY_SCHEMA = 1
# Regions partitioned by the exclusive (`*_self_ms`) columns; other annotations are listed inclusive only.
REGIONS = ("forward", "backward", "spatial", "temporal", "attention", "optimizer")
TOP_N = 15

_STEP_RE = re.compile(r"^ProfilerStep#\d+$")
_BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver", "runtime")
TIME_BASIS = ("range_ms: CPU wall of the record_function ranges (outermost occurrence); backward_ms: CPU wall "
              "of autograd nodes whose forward op ran inside the range (by sequence number); gpu_ms: device time "
              "of kernels launched inside the range or by its backward nodes (by correlation id); *_self_ms: "
              "exclusive of nested tracked regions; total_ms: range_ms + backward_ms (for `backward`: its range, else "
              "its nodes); milliseconds per profiled step")


def profile_training_steps(step_fn: Callable[[], Any], out_dir: Path, *, device: str, wait: int = 1,
                           warmup: int = 1, active: int = 3, with_stack: bool = False,
                           profile_memory: bool = False) -> dict:
    """Profile `wait + warmup + active` calls of `step_fn`; write the trace and summary.json; return the summary.

    Memory events and shapes are opt-in (`profile_memory`): they multiply the trace's size. The profiler's own
    stderr lines (USDT, CPUAllocator notices) go to PROFILER_LOG in `out_dir`, not the user's terminal.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    if wait < 0 or warmup < 0 or active < 1:
        raise ValueError(f"need wait >= 0, warmup >= 0, active >= 1; got {wait}, {warmup}, {active}")
    device, out_dir = str(device), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    on_cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    before = set(out_dir.glob("*.pt.trace.json"))
    with _stderr_to(out_dir / PROFILER_LOG), profile(
            activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(out_dir)), profile_memory=profile_memory,
            record_shapes=profile_memory, with_stack=with_stack) as prof:
        for _ in range(wait + warmup + active):
            step_fn()
            if on_cuda:
                torch.cuda.synchronize(device)  # a step ends when its kernels end: per-step totals stay honest
            prof.step()
    written = sorted(set(out_dir.glob("*.pt.trace.json")) - before, key=lambda p: p.stat().st_mtime)
    if not written:
        raise RuntimeError(f"torch.profiler wrote no trace into {out_dir}")
    trace_file = written[-1]
    summary = summarize_trace(json.loads(trace_file.read_text()))
    summary.update(device=device, trace_file=trace_file.name, wait=wait, warmup=warmup, active=active)
    tmp = out_dir / (SUMMARY_FILE + ".tmp")  # written whole or not at all: a report may read it mid-sweep
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out_dir / SUMMARY_FILE)
    return summary


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send file descriptor 2 to `path`: kineto writes its notices from C++, past sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class _Span:
    """One complete ('X') event of a thread: its extent and what it means for attribution."""

    __slots__ = ("name", "cat", "start", "end", "seq", "kind")

    def __init__(self, event: dict, kind: str):
        self.name, self.cat = event.get("name", ""), event.get("cat", "")
        self.start = float(event["ts"])
        self.end = self.start + float(event.get("dur", 0))
        self.seq = (event.get("args") or {}).get("Sequence number")
        self.kind = kind  # "step" | "region" | "annotation" | "backward" | "op"


def _enclosing(spans: list[_Span], queries: list[tuple[float, Any]]) -> dict[Any, list[_Span]]:
    """For each (time, key) query, the spans of one thread open at that time, outermost first.

    Spans of one thread nest properly, so one sweep with a stack answers every query.
    """
    spans = sorted(spans, key=lambda s: (s.start, -s.end))
    answers, stack, i = {}, [], 0
    for time, key in sorted(queries, key=lambda q: q[0]):
        while i < len(spans) and spans[i].start <= time:
            while stack and stack[-1].end <= spans[i].start:
                stack.pop()
            stack.append(spans[i])
            i += 1
        while stack and stack[-1].end < time:
            stack.pop()
        answers[key] = [s for s in stack if s.start <= time <= s.end]
    return answers


def _self_times(spans: list[_Span]) -> dict[int, float]:
    """Duration minus the duration of direct children, per span (keyed by id), for one thread."""
    result, stack = {}, []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        while stack and stack[-1].end <= span.start:
            stack.pop()
        result[id(span)] = span.end - span.start
        if stack:
            result[id(stack[-1])] -= span.end - span.start
        stack.append(span)
    return result


def _ms(us: float, steps: int) -> float:
    return round(us / 1000.0 / steps, 4)


@dataclass
class _Parsed:
    """A Chrome trace's complete events sorted by what they are."""

    by_thread: dict  # (pid, tid) -> host spans: step markers, regions, annotations, ops, backward nodes
    ops: list  # (thread, span) of every cpu_op
    device_events: list  # kernels, memcpys, memsets
    launches: dict  # correlation id -> (launching thread, launch time)


def _parse(trace: dict, regions: tuple[str, ...]) -> _Parsed:
    parsed = _Parsed(defaultdict(list), [], [], {})
    for e in trace.get("traceEvents", []):
        if not isinstance(e, dict) or e.get("ph") != "X" or "ts" not in e:
            continue
        cat, name = e.get("cat", ""), e.get("name", "")
        thread = (e.get("pid"), e.get("tid"))
        if cat in _DEVICE_CATS:
            parsed.device_events.append(e)
        elif cat in _LAUNCH_CATS:
            parsed.launches[(e.get("args") or {}).get("correlation")] = (thread, float(e["ts"]))
        elif cat == "user_annotation":
            kind = "step" if _STEP_RE.match(name) else "region" if name in regions else "annotation"
            parsed.by_thread[thread].append(_Span(e, kind))
        elif cat == "cpu_op":
            span = _Span(e, "backward" if name.startswith(_BACKWARD_PREFIX) else "op")
            parsed.by_thread[thread].append(span)
            parsed.ops.append((thread, span))
    return parsed


def _forward_regions(parsed: _Parsed) -> dict:
    """Autograd sequence number of each forward op -> the regions it ran in (outermost first)."""
    first_seen = {}
    for thread, span in parsed.ops:
        if span.kind == "op" and span.seq is not None and span.seq >= 0 and span.seq not in first_seen:
            first_seen[span.seq] = (thread, span.start)
    chains = {}
    for thread, spans in parsed.by_thread.items():
        queries = [(t, seq) for seq, (th, t) in first_seen.items() if th == thread]
        for seq, stack in _enclosing(spans, queries).items():
            chains[seq] = [s.name for s in stack if s.kind == "region" and s.name != "forward"]
    return chains


def _region_chain(stack: list[_Span], forward_chain: dict, regions: tuple[str, ...]) -> list[str]:
    """Tracked regions (outermost first) that own a moment whose open spans are `stack`: the open regions, and
    for a backward node the regions of its forward op."""
    chain, in_backward = [], False
    for s in stack:
        if s.kind == "region" and s.name not in chain:
            chain.append(s.name)
        elif s.kind == "backward" and not in_backward:
            in_backward = True
            if "backward" in regions and "backward" not in chain:
                chain.append("backward")
            chain += [r for r in forward_chain.get(s.seq, []) if r not in chain]
    return chain


def _nested_dict():
    return defaultdict(lambda: defaultdict(float))


def _host_times(parsed: _Parsed, forward_chain: dict, regions: tuple[str, ...]) -> tuple[dict, dict]:
    """(region totals, annotation totals) of host time: range time (inclusive and exclusive) and backward nodes."""
    totals, annotations = _nested_dict(), _nested_dict()
    for spans in parsed.by_thread.values():
        # Exclusive range time: nested tracked regions and backward nodes (which belong to the region of
        # their forward op) are taken out, so range_self_ms + backward_self_ms partition the step.
        outer_backward = _outermost([s for s in spans if s.kind == "backward"])
        region_spans = [s for s in spans if s.kind == "region"]
        region_self = _self_times(region_spans + outer_backward)
        for span in region_spans:
            totals[span.name]["range_self_ms"] += region_self[id(span)]
        for kind in ("region", "annotation"):
            for name in {s.name for s in spans if s.kind == kind}:
                # outermost occurrence of each name: a region nested in itself counts once
                for span in _outermost([s for s in spans if s.kind == kind and s.name == name]):
                    annotations[name]["calls"] += 1
                    annotations[name]["cpu_ms"] += span.end - span.start
                    if kind == "region":
                        totals[name]["calls"] += 1
                        totals[name]["range_ms"] += span.end - span.start
        # Backward nodes: outermost evaluate_function spans, attributed to their forward op's regions.
        stacks = _enclosing(spans, [(s.start, id(s)) for s in outer_backward])
        for span in outer_backward:
            chain = _region_chain(stacks[id(span)], forward_chain, regions)
            for region in chain:
                totals[region]["backward_ms"] += span.end - span.start
            if chain:
                totals[chain[-1]]["backward_self_ms"] += span.end - span.start
    return totals, annotations


def _device_times(parsed: _Parsed, forward_chain: dict, regions: tuple[str, ...], totals: dict,
                  step_spans: list[_Span]) -> tuple[list[float], dict]:
    """Device time per region (added to `totals`) and per profiled step, and per-kernel totals. Each kernel goes
    to the regions open at its launch on the launching thread, and to the step it was launched in."""
    step_gpu = [0.0] * len(step_spans)
    step_starts = [s.start for s in step_spans]
    launch_queries: dict[Any, list] = defaultdict(list)
    launch_time = {}
    for index, e in enumerate(parsed.device_events):
        launch = parsed.launches.get((e.get("args") or {}).get("correlation"))
        if launch is not None:
            launch_queries[launch[0]].append((launch[1], index))
            launch_time[index] = launch[1]
    for thread, queries in launch_queries.items():
        for index, stack in _enclosing(parsed.by_thread.get(thread, []), queries).items():
            dur = float(parsed.device_events[index].get("dur", 0))
            chain = _region_chain(stack, forward_chain, regions)
            for region in chain:
                totals[region]["gpu_ms"] += dur
            if chain:
                totals[chain[-1]]["gpu_self_ms"] += dur
            # the step a kernel belongs to: by launch time (backward may launch from another thread)
            k = bisect.bisect_right(step_starts, launch_time[index]) - 1
            if k >= 0 and launch_time[index] <= step_spans[k].end:
                step_gpu[k] += dur
    kernel_stats = _nested_dict()
    for e in parsed.device_events:
        stat = kernel_stats[e.get("name", "?")]
        stat["calls"] += 1
        stat["total_ms"] += float(e.get("dur", 0))
    return step_gpu, kernel_stats


def _operator_stats(parsed: _Parsed) -> dict:
    """Calls, total and self host time of every operator and backward node."""
    op_stats = _nested_dict()
    for spans in parsed.by_thread.values():
        selfs = _self_times([s for s in spans if s.kind in ("op", "backward", "annotation", "region")])
        for s in spans:
            if s.kind in ("op", "backward"):
                stat = op_stats[s.name]
                stat["calls"] += 1
                stat["total_ms"] += s.end - s.start
                stat["self_ms"] += selfs[id(s)]
    return op_stats


def _region_rows(totals: dict, regions: tuple[str, ...], steps: int, has_gpu: bool) -> dict:
    """Per-step milliseconds of each region, the tracked ones first."""
    rows = {}
    keys = ["range_ms", "range_self_ms", "backward_ms", "backward_self_ms"] + (["gpu_ms", "gpu_self_ms"] if has_gpu
                                                                              else [])
    for name in [r for r in regions if r in totals] + sorted(set(totals) - set(regions)):
        row = totals[name]
        rr = rows[name] = {"calls": round(row["calls"] / steps, 2), **{k: _ms(row[k], steps) for k in keys}}
        # backward nodes run inside an annotated `backward` range: there the two are the same time
        rr["total_ms"] = (rr["range_ms"] or rr["backward_ms"]) if name == "backward" else round(
            rr["range_ms"] + rr["backward_ms"], 4)
    return rows


def summarize_trace(trace: dict, regions: tuple[str, ...] = REGIONS, top_n: int = TOP_N) -> dict:
    """Per-region times, per-step totals and top operators/kernels of one Chrome trace from torch.profiler."""
    parsed = _parse(trace, regions)
    forward_chain = _forward_regions(parsed)
    # profiled steps: the ProfilerStep#N ranges (of the thread that called prof.step())
    step_spans = sorted((s for spans in parsed.by_thread.values() for s in spans if s.kind == "step"),
                        key=lambda s: s.start)
    steps = max(len(step_spans), 1)
    totals, annotations = _host_times(parsed, forward_chain, regions)
    step_gpu, kernel_stats = _device_times(parsed, forward_chain, regions, totals, step_spans)
    has_gpu = bool(parsed.device_events)
    return {
        "schema": SUMMARY_SCHEMA,
        "time_basis": TIME_BASIS,
        "profiled_steps": len(step_spans),
        "step_ms": [round((s.end - s.start) / 1000.0, 4) for s in step_spans],
        "step_gpu_ms": [round(t / 1000.0, 4) for t in step_gpu] if has_gpu else None,
        "regions": _region_rows(totals, regions, steps, has_gpu),
        "annotations": {name: {"calls": round(row["calls"] / steps, 2), "cpu_ms": _ms(row["cpu_ms"], steps)}
                        for name, row in sorted(annotations.items())},
        "top_operators": _top(_operator_stats(parsed), "self_ms", top_n, steps),
        "top_kernels": _top(kernel_stats, "total_ms", top_n, steps) if has_gpu else [],
        "peak_allocated_bytes": _memory_peaks([e for e in trace.get("traceEvents", []) if isinstance(e, dict)]),
    }


def _outermost(spans: list[_Span]) -> list[_Span]:
    result, end = [], float("-inf")
    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        if s.start >= end:
            result.append(s)
            end = s.end
    return result


def _top(stats: dict, key: str, top_n: int, steps: int) -> list[dict]:
    rows = [{"name": name, "calls": round(row["calls"] / steps, 2),
             **{k: _ms(v, steps) for k, v in row.items() if k != "calls"}} for name, row in stats.items()]
    return sorted(rows, key=lambda r: -r[key])[:top_n]


def _memory_peaks(events: list[dict]) -> dict[str, int]:
    """Highest `Total Allocated` seen by the profiler's memory events, per device ('cpu', 'cuda:0')."""
    peaks: dict[str, int] = {}
    for e in events:
        if e.get("name") != "[memory]":
            continue
        args = e.get("args") or {}
        device = "cpu" if args.get("Device Type", 0) == 0 else f"cuda:{args.get('Device Id', 0)}"
        peaks[device] = max(peaks.get(device, 0), int(args.get("Total Allocated", 0)))
    return peaks


def load_summary(trace_dir: Path) -> dict | None:
    """The summary.json of a trace folder, or None when absent or unreadable."""
    try:
        summary = json.loads((Path(trace_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None

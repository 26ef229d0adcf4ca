"""Where a predicted step time goes wrong: predicted against measured GPU time by kernel class, for one case.

The measured side is a profiler trace of `stbench run --trace` on a GPU: each kernel's time goes to the aten op
that launched it (the kernel's `External id` names the innermost profiled op around its launch). The predicted
side is `stbench predict`'s fake step of the same case: each recorded op's expected time (roofline.op_seconds
with the hardware's efficiencies). Both sides are grouped by the same classes of aten op names (CLASSES), and
the table gives each class's milliseconds and kernel counts per step, the difference, and the measured step.

    python scripts/kernel_classes.py TRACE[.json.gz] [--markdown] -- PREDICT FLAGS (one case, one --hardware)
    python scripts/kernel_classes.py \\
        reports/baselines/nvidia-h200/raw/traces/wan-1.3b-full-r480-f33-b1-bf16-cuda/trace.json.gz \\
        -- --arch wan --preset 1.3b --resolution 480 --frames 33 --batch 1 --mode full --dtype bf16 --hardware h200
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stbench.predict import command, efficiency, estimate, roofline  # noqa: E402
from stbench.predict import hardware as hw  # noqa: E402

# (class, pattern on the aten op's base name, e.g. "mm", "_to_copy", "_foreach_add_"); first match wins
CLASSES = (
    ("attention backward", r"attention.*backward|flex_attention_backward"),
    ("attention forward", r"attention"),
    ("gemm and convolution", r"^(mm|addmm|bmm|baddbmm|matmul|linear|convolution|cudnn_convolution\w*|"
                             r"convolution_backward|_convolution)$"),
    ("optimizer (foreach/fused)", r"^_foreach_|^_fused_adam"),
    ("copy and cast", r"^(copy_|_to_copy|clone|contiguous|to|_copy_from\w*)$"),
    ("norm", r"norm"),
    ("reduction", r"^(sum|mean|amax|amin|max|min|var|std|_softmax\w*|softmax|logsumexp|argmax|topk|sort|cumsum|"
                  r"any|all|nonzero)"),
    ("fill and zero", r"^(fill_|zero_|zeros|ones|full|empty\w*|new_zeros|new_full)"),
    ("cat, index and gather", r"^(cat|stack|index\w*|gather|scatter\w*|embedding\w*|masked\w*|where|repeat\w*|"
                              r"constant_pad_nd|slice_backward|select_backward|_unsafe_\w*)$"),
)
OTHER = "elementwise and other"
NAMES = [name for name, _ in CLASSES] + [OTHER]


def op_class(name: str) -> str:
    """The class of an aten op, from 'aten::mm', 'aten.mm.default' or 'mm'."""
    base = name.split("::")[-1]
    if base.startswith("aten."):
        base = base.split(".")[1]
    for cls, pattern in CLASSES:
        if re.search(pattern, base):
            return cls
    return OTHER


def measured(trace_path: Path) -> tuple[dict, dict, float, int]:
    """Per class: kernel ms and kernel count per profiled step; the profiled step's CPU ms; profiled steps."""
    opener = gzip.open if trace_path.suffix == ".gz" else open
    with opener(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    op_name = {e["args"]["External id"]: e["name"] for e in events
               if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})}
    steps = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#")]
    n = max(1, len(steps))
    ms, count = defaultdict(float), defaultdict(int)
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy"):
            cls = "fill and zero" if e["cat"] == "gpu_memset" else op_class(op_name.get(e["args"].get("External id"),
                                                                                        "?"))
            ms[cls] += e["dur"] / 1e3 / n
            count[cls] += 1
    step_ms = sum(e["dur"] for e in steps) / 1e3 / n if steps else float("nan")
    return ms, {k: v / n for k, v in count.items()}, step_ms, len(steps)


def predicted(flags: list[str]) -> tuple[dict, dict, dict]:
    """Per class: expected ms and kernel count of the case's fake step; and its `predicted` record object."""
    parser = argparse.ArgumentParser(prog="kernel_classes.py -- PREDICT FLAGS")
    command.add_arguments(parser)
    args = parser.parse_args(flags)
    sweep = command.sweep_from_args(args)
    cases = [sweep.case(*point) for point in sweep.grid()]
    if len(cases) != 1:
        parser.error("give exactly one case and one --hardware")
    target = hw.get(sweep.hardware[0])
    trace = estimate.cached_trace(cases[0], estimate.foreach_for(target))
    chosen = efficiency.for_hardware(target)
    ms, count = defaultdict(float), defaultdict(int)
    for op in trace.ops:
        cls = op_class(op.name)
        ms[cls] += roofline.op_seconds(op, target, chosen)[2] * 1e3
        count[cls] += 1
    return ms, count, estimate.prediction(trace, target)


def table(meas, pred, step_ms, steps, markdown: bool) -> str:
    (m_ms, m_n), (p_ms, p_n, record) = meas, pred
    rows = [(cls, p_ms.get(cls, 0.0), m_ms.get(cls, 0.0), p_n.get(cls, 0), m_n.get(cls, 0)) for cls in NAMES]
    rows.append(("all kernels", sum(p_ms.values()), sum(m_ms.values()), sum(p_n.values()), sum(m_n.values())))
    head = ("class", "predicted ms", "measured ms", "pred - meas ms", "predicted kernels", "measured kernels")
    body = [(c, f"{p:.1f}", f"{m:.1f}", f"{p - m:+.1f}", f"{pn:.0f}", f"{mn:.0f}") for c, p, m, pn, mn in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in (head, *body)]
    lines.append("")
    lines.append(f"predicted step_ms {record['step_ms']:.1f} (expected, attention backend "
                 f"{record['attention_backend']}); measured: the profiled step's CPU wall {step_ms:.1f} ms "
                 f"({steps} profiled step(s), under the profiler), its kernels' sum above. Kernel counts include "
                 f"memsets; predicted kernels are the fake step's recorded ops (one kernel each).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    own.add_argument("trace", type=Path, help="a profiler trace of `stbench run --trace` (.json or .json.gz)")
    own.add_argument("--markdown", action="store_true", help="a markdown table")
    args = own.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    m_ms, m_n, step_ms, steps = measured(args.trace)
    print(table((m_ms, m_n), predicted(flags), step_ms, steps, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())

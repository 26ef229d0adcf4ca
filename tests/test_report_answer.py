"""The report's answer for predictions and plans: ranked layouts as `stbench plan` ranks them, why a layout does
not fit, figures whose labels never overlap, no empty section, every invocation with its settings, MFU in %."""
from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
from itertools import combinations
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from stbench import results
from stbench.cli import main as stbench_main
from stbench.report import answer, recommend, validation
from stbench.report.__main__ import main

REPO = Path(__file__).resolve().parents[1]
WAN = REPO / "reports" / "predict" / "fsdp-wan-14b"
FRONTIER = REPO / "reports" / "predict" / "frontier-sd15"
TRAINED = REPO / "reports" / "train" / "unet-tiny-finetune"
GAP = 2  # pixels between two labels, at least
_spec = importlib.util.spec_from_file_location("fake_run", Path(__file__).parent / "fixtures" / "fake_run.py")
fake_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_run)


def drawn_texts(fig) -> list:
    """The texts a figure draws: tick labels of the ticks inside the view (matplotlib keeps label objects for
    ticks outside it, never drawn), axis labels and offsets, titles, annotations and legends."""
    texts = list(fig.texts) + [t for legend in fig.legends for t in legend.get_texts()]
    if getattr(fig, "_suptitle", None) is not None:
        texts.append(fig._suptitle)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis._update_ticks():  # the ticks the axis draws
                texts += [label for label in (tick.label1, tick.label2) if label.get_visible()]
            texts += [axis.label, axis.get_offset_text()]
        texts += [ax.title, ax._left_title, ax._right_title] + list(ax.texts)
        if ax.get_legend() is not None:
            texts += list(ax.get_legend().get_texts())
    return texts


def text_boxes(fig) -> list[tuple[str, object]]:
    """Every drawn, non-empty text of a figure with its box in display pixels (drawn again first: saving with a
    tight bounding box leaves positions from another layout)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(fig)
            if t.get_visible() and t.get_text().strip()]


def overlaps(boxes) -> list[tuple[str, str]]:
    """Pairs of texts whose boxes overlap or come closer than GAP pixels (jammed labels read as one)."""
    found = []
    for (a, box_a), (b, box_b) in combinations(boxes, 2):
        width = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        height = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        if width > -GAP and height > -GAP:
            found.append((a, b))
    return found


def plan_run(out: Path) -> tuple[Path, str]:
    """A real `stbench plan` of a tiny DiT on 2 GPUs: its run folder and its plan.txt."""
    assert stbench_main(["plan", "--arch", "dit-full", "--mode", "full", "--resolution", "64", "--frames", "8",
                         "--gpus", "2", "--activation-checkpointing", "none", "--out", str(out)]) == 0
    return out, (out / "plan.txt").read_text()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Reports of a measured run, the committed wan 14b predictions, a plan, a one-GPU frontier and a training
    run, with the texts of every figure they drew (captured as the report closes each figure)."""
    tmp = tmp_path_factory.mktemp("answer")
    runs = {"fake": fake_run.write_fake_run(tmp / "fake", seed=0, torn=True), "wan": WAN,
            "frontier": FRONTIER, "train": TRAINED}
    runs["plan"], plan_text = plan_run(tmp / "plan")
    drawn = {}
    close = plt.close

    def capture(fig=None):
        if fig is not None and hasattr(fig, "canvas"):
            drawn.setdefault(current, []).append(text_boxes(fig))
        return close(fig)

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt, "close", capture)
        for current, run in runs.items():
            target = tmp / f"{current}.html"
            assert main([str(run), "-o", str(target)]) == 0
            out[current] = target.read_text()
    return {"html": out, "figures": drawn, "plan": plan_text, "runs": runs}


def _section(html: str, anchor: str) -> str:
    start = html.index(f'<section id="{anchor}"')
    return html[start:html.index("</section>", start)]


def test_headline_names_the_same_best_layout_as_plan(rendered):
    best = re.search(r"recommended \(predicted\): (.+?): [\d.]+ samples/s", rendered["plan"]).group(1)
    section = _section(rendered["html"]["plan"], "answer")
    headline = re.search(r'<p class="verdict headline">(.*?)</p>', section, re.S).group(1)
    assert f"best {best} on 2 GPUs" in headline
    # a tiny DiT's kernels are microseconds each: predict warned, and the answer says so beside the step time
    assert "Host-bound risk (predicted): its kernels are too small and many" in headline
    assert "host-bound risk: the CPU may not launch its kernels as fast" in section  # and in the layouts' table
    [group] = answer.groups(results.read_records(rendered["runs"]["plan"]))
    assert group.ranked[0].name == best
    assert [o.samples_per_s for o in group.ranked] == sorted((o.samples_per_s for o in group.ranked), reverse=True)
    # the report opens with the answer
    main_html = rendered["html"]["plan"].split("<main>", 1)[1]
    assert re.search(r'<section id="([\w-]+)"', main_html).group(1) == "answer"


def test_what_does_not_fit_and_why(rendered):
    groups = {g.shape: g for g in answer.groups(results.read_records(WAN))}
    g480, g720 = groups["640px x 81 frames, batch 1"], groups["960px x 81 frames, batch 1"]
    assert g480.fewest.gpus == 8 and g480.fewest.name == "fsdp 8, checkpointing blocks"
    assert g480.ranked[0].name == "fsdp 16, checkpointing blocks"  # twice the samples per second
    assert g720.fewest.name == "fsdp 2 x ulysses 4, checkpointing blocks"
    nothing = [r for r in g720.reasons if r.startswith("with checkpointing blocks:")]
    assert nothing and "more GPUs do not help; try context parallelism" in nothing[0]
    assert "(fitted on 8 and 16 GPUs)" in nothing[0]  # the largest sharded layouts; one GPU runs unsharded
    assert any(r.startswith("without activation checkpointing:") and "try activation checkpointing" in r
               for r in g480.reasons)
    section = _section(rendered["html"]["wan"], "answer")
    assert "(predicted)" in section and "Does not fit:" in section
    assert "fewer than 8 GPUs do not fit" in section


def test_unshrinkable_part_is_fitted_on_the_two_largest_degrees():
    from stbench.predict.command import unshrinkable

    a, b = 40 * 2**30, 300 * 2**30
    fit = unshrinkable([(w, a + b / w) for w in (1, 2, 8)])
    assert fit[:2] == pytest.approx((a, b)) and fit[2] == (2, 8)  # the two degrees it went through
    # peaks that flatten faster than 1/GPUs: the floor is read off the largest degrees, not pulled down by 2
    flattening = [(2, 197.8), (4, 124.9), (8, 101.6), (16, 95.1)]
    assert unshrinkable(flattening)[0] == pytest.approx(95.1 - (101.6 - 95.1))
    assert unshrinkable([(4, 10), (4, 11)]) is None


def test_time_parts_add_up_to_the_step():
    p = {"step_ms": 120.0, "kernels_ms": 100.0, "comm_overlapped_ms": 60.0, "comm_blocking_ms": 20.0}
    parts = answer.time_parts(p)
    assert parts == {"compute": 40.0, "hidden": 60.0, "exposed": 20.0} and sum(parts.values()) == p["step_ms"]
    assert answer.time_parts({"step_ms": 5.0}) == {"compute": 5.0, "hidden": 0.0, "exposed": 0.0}
    assert answer.time_parts({"step_ms": None}) is None


def test_mfu_is_a_percentage(rendered):
    record = next(r for r in results.read_records(WAN) if r["status"] == "ok")
    mfu = record["predicted"]["mfu"]
    assert 0.1 < mfu < 1  # the record holds a fraction
    html = rendered["html"]["wan"]
    assert f"{100 * mfu:.1f}%" in _section(html, "answer") and f"{100 * mfu:.1f}%" in _section(html, "predicted")
    assert f">{mfu:.1f}%<" not in html


def test_no_figure_overlaps_its_labels_or_prints_none(rendered):
    drawn = rendered["figures"]
    assert set(drawn) >= {"fake", "wan", "plan", "frontier", "train"}
    assert sum(len(figs) for figs in drawn.values()) >= 12
    for name, figs in drawn.items():
        for boxes in figs:
            assert not overlaps(boxes), f"{name}: overlapping labels {overlaps(boxes)[:3]}"
            for text, _ in boxes:
                assert not re.search(r"\bnone", text, re.I), f"{name}: a label reads {text!r}"


def test_sections_that_do_not_apply_are_left_out(rendered, tmp_path):
    wan = rendered["html"]["wan"]
    for anchor in ("recommendation", "verdict", "figures", "traces", "records", "training"):
        assert f'id="{anchor}"' not in wan
    for text in ("nothing to recommend", "No figure", "This run has no traces", "no pair to compare",
                 "No warnings were recorded", "Every case completed"):
        assert text not in wan
    for html in rendered["html"].values():  # every section present has more than its heading
        for body in re.findall(r'<section id="[\w-]+">\s*<h2>[^<]*</h2>(.*?)</section>', html, re.S):
            assert re.sub(r"<[^>]+>|\s", "", body), "an empty section"
    fake = rendered["html"]["fake"]
    assert 'id="answer"' not in fake and 'id="predicted"' not in fake  # a measured run has no predictions


def test_every_invocation_is_listed_with_its_own_settings(rendered):
    info = json.loads((WAN / "run.json").read_text())
    html = _section(rendered["html"]["wan"], "environment")
    assert f"{len(info['invocations'])} commands wrote into this run" in html
    rows = re.findall(r"<tr><td class=\"num\">\d+</td>.*?</tr>", html, re.S)
    assert len(rows) == len(info["invocations"]) == 7
    assert "<code>world_sizes=8, 16</code>" in rows[2] and "<code>fsdp=4</code>" in rows[6]
    assert "<code>fsdp=4</code>" not in rows[2]
    written = len((WAN / "results.jsonl").read_text().splitlines())
    assert sum(int(n) for n in re.findall(r'<td class="num">(\d+)</td></tr>', "".join(rows))) == written


def pvm_fields():
    from stbench.predicted_vs_measured import CSV_FIELDS
    return CSV_FIELDS


def test_published_errors_beside_predictions(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("results.jsonl", "run.json"):
        shutil.copy(WAN / name, run / name)
    monkeypatch.setattr(validation, "SUMMARY", tmp_path / "absent.json")
    monkeypatch.setattr(validation, "GPU_TABLES", tmp_path / "no-baselines")
    assert main([str(run), "-o", str(tmp_path / "a.html")]) == 0
    assert "checked against" not in (tmp_path / "a.html").read_text()
    summary = {"rows": 9, "memory_rows": 9, "time_rows": 2, "median_abs_memory_error": 0.07,
               "median_abs_time_error": 0.31, "within_10pct_memory": 6, "within_25pct_time": 1,
               "table": "reports/predict/published/table.md"}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(validation, "SUMMARY", tmp_path / "summary.json")
    assert main([str(run), "-o", str(tmp_path / "b.html")]) == 0
    html = (tmp_path / "b.html").read_text()
    sentence = ("checked against 9 published GPU training runs: median memory error 7% (9 figures), time error 31% "
                "(2 figures)")
    assert sentence in _section(html, "answer") and sentence in _section(html, "predicted")
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "time_rows": 0, "median_abs_time_error": None}))
    assert validation.sentence(tmp_path / "summary.json").endswith("median memory error 7% (9 figures) "
                                                                   "(table: reports/predict/published/table.md)")
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "runs": 5}))
    assert validation.sentence(tmp_path / "summary.json").startswith("checked against 9 measurements of 5 published")
    # a GPU baseline's table of the current model against its sweep: memory and step errors, and their sign
    table = tmp_path / "reports" / "baselines" / "nvidia-h200" / validation.GPU_TABLE
    table.parent.mkdir(parents=True)
    measured = [dict(case=f"c{i}", hardware="h200", fits=True, measured_on="NVIDIA H200", allocated_predicted=a,
                     allocated_measured=100, step_ms_predicted=s, step_ms_measured=200)
                for i, (a, s) in enumerate([(96, 100), (101, 180), (90, 210)])]
    unmeasured = dict(case="c3", hardware="h200", fits=True, measured_on="", allocated_predicted=1,
                      step_ms_predicted=1)  # predicted, never measured: left out
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=pvm_fields())
        writer.writeheader()
        writer.writerows([*measured, unmeasured])
    gpu = validation.gpu_sentence(tmp_path / "reports" / "baselines")
    assert gpu == ("against 3 cases measured on NVIDIA H200: median allocated-memory error 4%, median step-time "
                   f"error 10% (2 of 3 predicted short, the worst -50%; table: {validation.GPU_TABLE})")
    assert validation.sentence(tmp_path / "summary.json", tmp_path / "reports" / "baselines").endswith(f"; and {gpu}")
    assert validation.sentence(tmp_path / "absent.json", tmp_path / "reports" / "baselines") == f"checked {gpu}"
    # a table that cannot be read says nothing, and never breaks a report: a zero, a NaN, a relative folder
    for bad in ("0", "nan"):
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=pvm_fields())
            writer.writeheader()
            writer.writerow({**measured[0], "step_ms_measured": bad})
        assert validation.gpu_sentence(tmp_path / "reports" / "baselines") is None
    assert validation.gpu_sentence(Path("no-such-relative-folder")) is None


def test_what_to_train_shows_predictions_of_another_preset(tmp_path):
    from test_recommend import _case

    serial, ladder = _case("serial-unet", 100, seed=1), _case("mobius-ladder-unet", 80, seed=2)
    sd15 = dict(serial, preset="sd15", resolution=256, frames=16, device="h100-sxm", step_ms_median=None,
                predicted={"hardware": "h100-sxm", "peak_bytes": 17 * 2**30, "fits": True, "step_ms": 47.6,
                           "step_ms_bound": 40.0})
    [rec] = recommend.recommend([serial, ladder, sd15], committed_root=tmp_path)
    [p] = next(o for o in rec.options if o.arch == "serial-unet").predicted
    assert p["hardware"] == "h100-sxm" and p["step_ms"] == 47.6 and p["step_ms_bound"] == 40.0
    assert p["case"].startswith("sd15, 256px, 16 frames")


def test_the_overlap_check_sees_overlapping_labels():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.text(0.5, 0.5, "largest case")
    ax.text(0.52, 0.5, "none frames @ 640px")
    boxes = text_boxes(fig)
    plt.close(fig)
    assert ("largest case", "none frames @ 640px") in overlaps(boxes)


def test_step_times_predicted_before_expected_times_are_labelled_bounds(rendered, tmp_path):
    """Records that predate the expected time (no step_ms_bound: the wan 14b predictions as first committed) have
    the roofline bound as their step_ms, and say so."""
    old = tmp_path / "wan-old"
    shutil.copytree(WAN, old)
    lines = [json.loads(line) for line in (old / "results.jsonl").read_text().splitlines()]
    for record in lines:
        if record.get("predicted"):
            record["predicted"]["step_ms"] = record["predicted"].pop("step_ms_bound", None)
    (old / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main([str(old), "-o", str(tmp_path / "old.html")]) == 0
    wan = _section((tmp_path / "old.html").read_text(), "answer")
    assert "roofline lower bound: predicted before expected times" in wan
    assert "roofline bound (predicted before expected times)" in wan
    plan = _section(rendered["html"]["plan"], "answer")  # predicted now: expected time, its bound beside it
    assert "predicted before expected times" not in plan and "bound " in plan

"""The HTML report: renders from partial runs, is self-contained and escaped, computes its verdicts."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stbench import results
from stbench.report.__main__ import main
from stbench.report.verdict import COMPARISONS, compare, time_ratio

_spec = importlib.util.spec_from_file_location("fake_run", Path(__file__).parent / "fixtures" / "fake_run.py")
fake_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_run)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A synthetic run with ok, oom and error cases, trace summaries and a torn last line."""
    return fake_run.write_fake_run(tmp_path_factory.mktemp("run") / "run", seed=0, torn=True)


@pytest.fixture(scope="module")
def html(run):
    assert main([str(run), "--title", "fixture report"]) == 0
    return (run / "report.html").read_text()


def _records(run):
    return {(r["arch"], r["resolution"], r["frames"]): r for r in results.read_records(run)}


def test_report_is_self_contained(html):
    for tag, attr, value in re.findall(r"<(\w+)[^>]*?\s(src|href)\s*=\s*[\"']([^\"']*)", html):
        assert value.startswith(("data:", "#")), f"<{tag} {attr}={value[:60]}> is not embedded"
    assert not re.search(r"<script[^>]*\ssrc\s*=", html)
    assert not re.search(r"<link\b", html)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", html)
    assert html.count('<img src="data:image/png;base64,') >= 4


def test_report_sections_and_failures(html, run):
    assert "<title>fixture report</title>" in html
    for anchor in ("environment", "verdict", "figures", "failures", "traces", "records"):
        assert f'id="{anchor}"' in html
    assert "python -m stbench run --arch serial-unet" in html  # the command from run.json
    assert "synthetic fixture GPU" in html  # environment from the records
    records = results.read_records(run)
    for record in records:
        if record["status"] != "ok":
            assert results.case_slug(record) in html  # oom and error cases are listed, not dropped
    assert html.count('<span class="status oom">oom</span>') >= 6
    assert "CUDA out of memory. Tried to allocate 2.50 GiB" in html
    assert "high variation: step time p90/p10" in html
    assert "tensorboard --logdir" in html and "ui.perfetto.dev" in html
    assert html.count("fixture.1.pt.trace.json") == 3  # one trace folder listed per traced case
    assert "OOM frontier" in html and "Time by region" in html


def test_verdict_numbers_are_computed_from_records(html, run):
    records = _records(run)
    serial, ladder = records[("serial-unet", 512, 8)], records[("mobius-ladder-unet", 512, 8)]
    speedup = serial["step_ms_median"] / ladder["step_ms_median"]
    saved = 100 * (1 - ladder["saved_activations"] / serial["saved_activations"])
    verdict = (f"On this run, mobius-ladder-unet used {100 * (1 - ladder['peak_allocated'] / serial['peak_allocated']):.1f}"
               f"% less peak memory and {saved:.1f}% less activation memory and was {speedup:.2f}x faster than "
               f"serial-unet")
    assert verdict in html
    assert "mobius-ladder-unet fit in memory where serial-unet ran out at 512px, 16 frames, batch 1" in html
    assert "On this run, dit-dsv used" in html
    assert "1 dit-dsv case(s) failed with an error" in html
    assert "sparse heads 62.5%, estimator recall" in html


def test_comparison_rows_pair_matching_configurations(run):
    records = results.read_records(run)
    mobius = compare(records, COMPARISONS[0])
    rows = {(r.candidate["arch"], r.candidate["resolution"], r.candidate["frames"]): r for r in mobius.rows}
    assert len(rows) == 12  # two candidates x six configurations
    row = rows[("mobius-unet", 256, 16)]
    assert row.reference["arch"] == "serial-unet" and row.reference["frames"] == 16
    assert row.activations_saved == pytest.approx(
        100 * (1 - row.candidate["saved_activations"] / row.reference["saved_activations"]))
    assert row.speedup.basis == "bootstrap 95%" and row.speedup.low < row.speedup.value < row.speedup.high
    assert rows[("mobius-ladder-unet", 512, 24)].note == "serial-unet: oom; mobius-ladder-unet fits"
    assert compare([r for r in records if r["arch"] != "serial-unet"], COMPARISONS[0]) is None


def test_time_ratio_interval():
    base = {"step_ms_median": 100.0, "step_ms_samples": [99.0, 100.0, 101.0, 100.0, 100.5]}
    fast = {"step_ms_median": 50.0, "step_ms_samples": [49.5, 50.0, 50.5, 50.0, 49.8]}
    ratio = time_ratio(base, fast)
    assert ratio.value == 2.0 and ratio.significant and 1.9 < ratio.low <= 2.0 <= ratio.high < 2.1
    few = time_ratio({"step_ms_median": 10.0, "step_ms_p10": 9.0, "step_ms_p90": 11.0},
                     {"step_ms_median": 10.0, "step_ms_p10": 9.0, "step_ms_p90": 11.0})
    assert few.basis == "p10-p90" and not few.significant
    assert few.low == pytest.approx(9 / 11) and few.high == pytest.approx(11 / 9)


def test_arch_names_and_errors_are_escaped(tmp_path):
    run = tmp_path / "evil"
    record = results.new_record({"arch": "<script>alert('arch')</script>", "preset": "tiny", "overrides": {},
                                 "mode": "temporal", "batch": 1, "frames": 4, "resolution": 64, "dtype": "fp32",
                                 "device": "cpu", "compile": False})
    record.update(status="error", error="boom <img src=x onerror=alert(1)>", warnings=["<b>bold</b>"])
    results.append_record(run / "results.jsonl", record)
    assert main([str(run), "--title", "<i>title</i>"]) == 0
    html = (run / "report.html").read_text()
    assert "<script>alert('arch')</script>" not in html
    assert "&lt;script&gt;alert(&#39;arch&#39;)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<b>bold</b>" not in html and "<i>title</i>" not in html


def test_baseline_delta_table(tmp_path, run):
    baseline = fake_run.write_fake_run(tmp_path / "baseline", seed=0, time_scale=0.8)
    out = tmp_path / "with-baseline.html"
    assert main([str(run), "--baseline", str(baseline), "-o", str(out)]) == 0
    html = out.read_text()
    assert 'id="baseline"' in html and f"Baseline <code>{baseline}</code>" in html
    now, before = _records(run)[("dit-full", 256, 8)], _records(baseline)[("dit-full", 256, 8)]
    ratio = now["step_ms_median"] / before["step_ms_median"]
    assert ratio == pytest.approx(1.25)
    section = html[html.index('id="baseline"'):html.index('id="traces"')]
    assert f"{ratio:.2f}x" in section
    assert section.count("<tr><td><code>") == 30  # every case of the run is matched by case_key


def test_partial_runs_render(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "results.jsonl").write_text("")
    assert main([str(empty)]) == 0
    html = (empty / "report.html").read_text()
    assert "The run has no result record yet" in html
    for anchor in ("recommendation", "verdict", "figures", "failures", "traces", "records"):
        assert f'id="{anchor}"' not in html  # sections that do not apply are left out, not shown empty
    partial = fake_run.write_fake_run(tmp_path / "partial", archs={"serial-unet", "dit-dsv"}, torn=True)
    (partial / "run.json").unlink()
    being_written = partial / "traces" / "dit-dsv-some-case"  # a trace whose summary is not written yet
    being_written.mkdir(parents=True)
    (being_written / "host_1.2.pt.trace.json").write_text('{"traceEvents": [')
    jsonl = partial / "results.jsonl"
    assert main([str(jsonl), "-o", str(tmp_path / "p.html")]) == 0
    html = (tmp_path / "p.html").read_text()
    assert 'id="verdict"' not in html and "the command is unknown" in html  # no pair to compare: no verdict
    assert "traces/dit-dsv-some-case/" in html and "no summary.json (trace still being written?)" in html


@pytest.mark.parametrize("content, message", [
    ('{"schema": 1, "arch": "x"}\nnot json\n{"schema": 1, "arch": "y"}\n', "malformed results file"),
    ('[1, 2]\n', "not a stbench result record"),
    ('{"schema": 1, "arch": "serial-unet"}\n', "record 1 has no valid 'preset'"),
])
def test_malformed_results_exit_2_with_one_line(tmp_path, capsys, content, message):
    (tmp_path / "results.jsonl").write_text(content)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stbench.report: error: ") and message in err and err.count("\n") == 1


def test_bad_input_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"stbench.report: error: no such run: {tmp_path / 'missing'}\n"
    (tmp_path / "results.jsonl").write_text("")
    (tmp_path / "run.json").write_text("{broken")
    assert main([str(tmp_path)]) == 2
    assert "run.json: not valid JSON" in capsys.readouterr().err
    assert main([str(tmp_path), "--no-such-flag"]) == 2
    assert capsys.readouterr().err.startswith("stbench.report: error: unrecognized arguments")


def test_module_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "stbench.report", str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == f"stbench.report: error: no such run: {tmp_path / 'nope'}"
    assert done.stdout == ""


def test_report_of_a_real_traced_run(tmp_path):
    """The runner's own output (conftest's toy architecture, one case out of memory) with --trace."""
    from stbench.config import Sweep
    from stbench.runner import run_sweep

    sweep = Sweep(archs=("toy-mlp",), resolutions=(16,), frames=(2,), batches=(1, 2), repeats=2, warmup=2,
                  overrides=(("fail", "oom"), ("fail_batch", "2")))
    run_sweep(sweep, tmp_path / "run", trace=True, progress=False, command="stbench run --trace (test)")
    ok = next(r for r in results.read_records(tmp_path / "run") if r["status"] == "ok")
    trace_dir = tmp_path / "run" / "traces" / results.case_slug(ok)
    assert (trace_dir / "summary.json").exists() and list(trace_dir.glob("*.pt.trace.json"))
    assert main([str(tmp_path / "run")]) == 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert f"traces/{results.case_slug(ok)}/" in html and "Time by region" in html
    assert "stbench run --trace (test)" in html and "injected by a test" in html

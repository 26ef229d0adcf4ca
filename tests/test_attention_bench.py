"""`python -m stbench attention`: records like run's, speed-ups against SDPA of the same token count."""
import json
import statistics

import pytest

from architectures.attention import CostTable
from stbench import cli, results


def test_attention_command_writes_records_with_speedups_against_sdpa(tmp_path, capsys):
    out = tmp_path / "att"
    code = cli.main(["attention", "--tokens", "128", "--sparsity", "0.5,0.75", "--heads", "2", "--head-dim", "8",
                     "--block-size", "16", "--repeats", "2", "--rounds", "2", "--warmup", "1", "--out", str(out)])
    assert code == 0
    records = results.read_records(out)
    assert [r["arch"] for r in records] == ["attention-sdpa", "attention-gather", "attention-gather"]
    assert all(r["status"] == "ok" and len(r["step_ms_samples"]) == 4 for r in records)  # 2 rounds x 2 repeats
    sdpa = statistics.median(records[0]["step_ms_samples"])
    for r, s, kept in zip(records[1:], (0.5, 0.75), (4, 2)):
        a = r["attention"]
        assert (a["sparsity"], a["kept_blocks"], a["blocks"], a["tokens"]) == (s, kept, 8, 128)
        assert a["speedup"] == pytest.approx(sdpa / r["step_ms_median"]) and a["ideal_speedup"] == 1 / (1 - s)
        assert a["efficiency"] == pytest.approx(a["speedup"] * (1 - s))
        assert a["computed_fraction"] == kept / 8
        # the computed tiles only, and SDPA's 14 N^2 D FLOPs per head less the score matmul (2 N^2 D) that the
        # gather kernel's backward does not redo: it keeps the forward's probabilities
        assert r["flops_per_step"] == records[0]["flops_per_step"] * kept // 8 * 12 // 14
    assert json.loads((out / "run.json").read_text())["command"].startswith("python -m stbench attention")
    assert CostTable.from_file(out).speedup("gather", 128, 0.5) == pytest.approx(records[1]["attention"]["speedup"])


@pytest.mark.parametrize("argv, message", [(["--sparsity", "1.0"], "sparsity"), (["--tokens", "x"], "tokens"),
                                           (["--backends", "cudnn"], "backends")])
def test_attention_command_refuses_bad_input_in_one_line(argv, message, tmp_path, capsys):
    assert cli.main(["attention", "--out", str(tmp_path / "a"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stbench: error:") and message in err and "\n" not in err


def test_report_shows_the_attention_records_beside_nothing_else(tmp_path):
    from stbench.report.render import render_report

    out = tmp_path / "att"
    assert cli.main(["attention", "--tokens", "64", "--sparsity", "0.5", "--heads", "1", "--head-dim", "8",
                     "--block-size", "16", "--repeats", "1", "--rounds", "1", "--warmup", "0", "--out", str(out)]) == 0
    html = render_report(out).read_text()
    assert "Sparse attention vs SDPA" in html and "data:image/png;base64," in html
    assert "sparsity (forced)" in html and html.count("<td>gather</td>") == 1 and html.count("<td>sdpa</td>") == 1

"""Predicted per-rank peak vs each rank's measured host_peak_bytes, and bytes per collective, in the folders of
reports/predict/fsdp-cpu-validation (writes its errors.txt): `python scripts/fsdp_prediction_errors.py`."""
import json, sys
from pathlib import Path
root = Path("reports/predict/fsdp-cpu-validation")
lines = ["predicted per-rank peak (stbench predict --hardware cpu) vs each rank's measured host_peak_bytes (gloo);",
         "bytes per collective: predicted == measured?", ""]
for folder in sorted(p for p in root.iterdir() if p.is_dir()):
    recs = [json.loads(l) for l in (folder / "results.jsonl").read_text().splitlines()]
    meas = {(r["resolution"], r["frames"]): r for r in recs if not r.get("predicted")}
    for r in recs:
        if not r.get("predicted"):
            continue
        m = meas[(r["resolution"], r["frames"])]
        p = r["predicted"]["peak_bytes"]
        errs = ", ".join(f"{p / h - 1:+.1%}" for h in m["rank_host_peak_bytes"])
        same = r["comm_bytes_by_collective"] == m["comm_bytes_by_collective"]
        lines.append(f"{folder.name:12s} {r['resolution']}px x{r['frames']}: predicted {p} B, measured per rank "
                     f"{m['rank_host_peak_bytes']} B -> error {errs}; bytes per collective equal: {same}")
text = "\n".join(lines) + "\n"
(root / "errors.txt").write_text(text)
print(text)

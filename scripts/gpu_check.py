"""The prepared GPU check behind scripts/gpu_check.sh: every step, its time limit, its log, and one summary.

Steps (each logged to OUT/logs/, timed, limited; the summary says ok, FAILED or skipped for each):
  setup      install the carried wheels (--target, no package index)
  env        import every package; the GPU, its slug (reports/baselines/<slug>/) and its hardware table entry
  pytest     pytest -m cuda (every CUDA-only test); `stbench predict` of the sweep's cases runs beside it
  sweep      `stbench run` of the fixed cases (GROUPS), bf16, NVML and allocator peaks, the DiT cases traced
  predict    waits for the predictions, then the predicted-vs-measured table
  attention  `stbench attention`: FlexAttention against SDPA at 16K tokens, s = 0.5, 0.75, 0.9
  bandwidth  scripts/hbm_bandwidth.py: the bandwidth eager memory-bound kernels reach (predict's memory classes)
  suites     the pytest-benchmark suites at a reduced size
  gate       `stbench gate` A/A (the suites and the sweep each against themselves; against this GPU's committed
             baseline too where one exists), the sweep's report, and the baseline folder OUT/reports/baselines/<slug>/
--dry-run: the same steps on the CPU at tiny presets and the smallest shapes; the steps that need CUDA (pytest -m
cuda) are listed as skipped, and predict, attention and suites start at once beside the sweep (DRY_BACKGROUND;
attention and suites, which need nothing the env step finds, beside env's imports already: DRY_EARLY).
Exit 0 only if every step ran (in a dry run, every step that does not need CUDA).

Runs with the standard library alone: stbench's commands run in child processes, several per process where they
share one step (`_BATCH`), so that the dry run pays for few interpreter starts.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIRED = ("torch", "diffusers", "peft", "transformers", "bitsandbytes")  # imported by the env step
WHEEL_DISTS = ("diffusers", "peft", "transformers", "bitsandbytes", "regex")  # scripts/gpu_wheels.sh downloads
DEADLINE_S = 570  # the whole check, so that it ends inside a 10-minute device call with time to pack OUT


@dataclass(frozen=True)
class Group:
    """Cases measured by one `stbench run` and predicted by one `stbench predict` (the same case flags)."""

    name: str
    archs: str
    gpu: tuple  # (preset, resolution, frames) on the GPU
    dry: tuple  # ... in the dry run: tiny preset, smallest shape
    mode: str
    flags: tuple = ()  # further case flags (--set, --lora)
    trace: bool = False
    needs: str | None = None  # a `run` flag this group needs (left out, and said so, where stbench lacks it)
    dry_archs: str | None = None  # the dry run's architectures, where fewer than `archs`

    def arch_list(self, dry: bool) -> str:
        return (self.dry_archs or self.archs) if dry else self.archs

    def cases(self, dry: bool) -> int:
        return len(self.arch_list(dry).split(","))

    def case_flags(self, dry: bool) -> list[str]:
        preset, resolution, frames = self.dry if dry else self.gpu
        return ["--arch", self.arch_list(dry), "--preset", preset, "--resolution", str(resolution),
                "--frames", str(frames), "--batch", "1", "--mode", self.mode, "--dtype", "bf16", *self.flags]


# The fixed cases. UNets at SD 1.5 size in Mobius' setting (temporal layers trained), 256 px x 16 frames; the DiT
# at DSV's 0.8B size, 512 px x 16 frames = 16,384 tokens, full and DSV with learned (default) and forced sparsity
# (these five are also in .github/workflows/gpu.yml's sweep, so the baseline gates that workflow's cases); Wan2.1
# 1.3B at 480 px x 33 frames (8,100 tokens; predicted 56.3 GiB: fits an 80 GB H100, where 81 frames do not).
GROUPS = (
    # the dry run measures one UNet (a tiny UNet costs more CPU than every other dry case together): Mobius
    Group("unets", "serial-unet,mobius-unet", ("sd15", 256, 16), ("tiny", 32, 2), "temporal",
          dry_archs="mobius-unet"),
    # traced, so that scripts/kernel_classes.py can split the DiTs' step-time error by kernel class (the H200 run
    # traced only the forced-sparsity case)
    Group("dits", "dit-full,dit-dsv", ("0.8b", 512, 16), ("tiny", 32, 2), "full", trace=True),
    Group("dsv-forced", "dit-dsv", ("0.8b", 512, 16), ("tiny", 32, 2), "full", ("--set", "sparsity=0.9"),
          trace=True),
    Group("wan", "wan", ("1.3b", 480, 33), ("tiny", 32, 5), "full"),
    Group("wan-lora", "wan", ("1.3b", 480, 33), ("tiny", 32, 5), "full", ("--lora", "64"), needs="--lora"),
)
# stbench attention at one 0.8B DiT layer's attention (12 heads of 96, DSV blocks of 128) and 16K tokens
ATTENTION_GPU = ["--tokens", "16384", "--heads", "12", "--head-dim", "96", "--block-size", "128",
                 "--backends", "flex", "--dtype", "bf16", "--device", "cuda"]
ATTENTION_DRY = ["--tokens", "256", "--heads", "1", "--head-dim", "16", "--block-size", "32", "--backends", "gather",
                 "--device", "cpu", "--repeats", "1", "--rounds", "1", "--warmup", "1"]
SPARSITIES = ["--sparsity", "0.5,0.75,0.9"]
# the suites' grid reduced to one shape: UNets (temporal and full) and the DiT (full, DSV) at 256 px x 8 frames
SUITES_GPU = ["--stbench-device", "cuda", "--stbench-grid", "full", "--stbench-arch",
              "serial-unet,mobius-unet,dit-full,dit-dsv", "--stbench-resolution", "256", "--stbench-frames", "8",
              "--stbench-batch", "1", "--stbench-rounds", "5"]
SUITES_DRY = ["--stbench-device", "cpu", "--stbench-grid", "tiny", "--stbench-arch", "dit-full",
              "--stbench-resolution", "32", "--stbench-frames", "2", "--stbench-rounds", "2", "--stbench-warmup", "1"]
# A dry run times nothing that matters: these CPU steps start at once and run beside the sweep (two cores). On the
# GPU only the predictions run beside another step (pytest -m cuda, which times nothing); the rest would disturb
# the timings.
DRY_BACKGROUND = ("predict", "attention", "suites")
DRY_EARLY = ("attention", "suites")  # ... started before env, whose single process leaves a core idle

# Time limits per step (seconds), and what each is expected to take on one H100 (estimated from the case sizes:
# see the README's GPU section). A step past its limit is stopped and marked FAILED; later steps still run
# within the overall deadline.
# Measured on the lent H200 (reports/baselines/nvidia-h200/raw/summary.txt): pytest 178 s of its then 180 s limit
# (FlexAttention's compilation at head dim 96: 114 s), the whole check 505 s.
STEPS = ("setup", "env", "pytest", "sweep", "predict", "attention", "bandwidth", "suites", "gate")
LIMITS = {"setup": 90, "env": 60, "pytest": 240, "sweep": 300, "predict": 120, "attention": 120, "bandwidth": 60,
          "suites": 150, "gate": 90}
ESTIMATES = {"setup": 20, "env": 5, "pytest": 90, "sweep": 190, "predict": 5, "attention": 45, "bandwidth": 20,
             "suites": 45, "gate": 15}
# hbm_bandwidth.py's sizes: 32 MB to 1 GB tensors (the 1M-element size only measures a launch's latency)
BANDWIDTH_GPU = ["--sizes", "1.6e7,6.4e7,2.56e8"]
BANDWIDTH_DRY = ["--device", "cpu", "--sizes", "4096", "--repeats", "2"]

# Several stbench commands in one interpreter: argv lists in sys.argv[1] (JSON), each echoed, worst exit code.
_BATCH = """
import json, shlex, sys, time
from stbench.cli import main
worst = 0
for argv in json.loads(sys.argv[1]):
    print("$ python -m stbench " + shlex.join(argv), flush=True)
    t0 = time.perf_counter()
    rc = main(argv)
    print(f"# exit {rc} after {time.perf_counter() - t0:.1f} s", flush=True)
    worst = worst or rc
sys.exit(worst)
"""

_ENV = """
import json, sys
import torch
from stbench.cli import build_parser
from stbench.errors import UserError
from stbench.gate import gpu_slug
from stbench.predicted_vs_measured import hardware_for_gpu
dry, path = sys.argv[1] == "dry", sys.argv[2]
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
for name in %r if dry or info["cuda_available"] else ():  # without CUDA a GPU check ends here: no imports
    module = __import__(name)
    info[name] = getattr(module, "__version__", "?")
if info["cuda_available"]:
    gpu = torch.cuda.get_device_name(0)
    hardware = hardware_for_gpu(gpu)
    info.update(gpu=gpu, slug=gpu_slug(gpu), hardware=hardware.name if hardware else None,
                hardware_label=hardware.label if hardware else None, devices=torch.cuda.device_count())
else:
    info.update(gpu=None, slug="dry-run", hardware=None, hardware_label=None, devices=0)
try:  # helper flags that newer stbench versions have (the LoRA case needs --lora)
    build_parser().parse_args(["run", "--arch", "wan", "--lora", "4"])
    info["run_flags"] = ["--lora"]
except (UserError, SystemExit):
    info["run_flags"] = []
with open(path, "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps(info))
""" % (REQUIRED[1:],)


@dataclass
class Outcome:
    """What one step did."""

    name: str
    status: str = "pending"  # ok | FAILED | skipped
    seconds: float = 0.0
    note: str = ""
    commands: list = field(default_factory=list)


class Check:
    """The steps, run in order against one deadline, each into OUT/logs/NN-<step>.log."""

    def __init__(self, out: Path, dry: bool, python: str, wheels: Path, site: Path, deadline_s: float):
        self.out, self.dry, self.python, self.wheels, self.site = out, dry, python, wheels, site
        self.deadline = time.monotonic() + deadline_s
        self.outcomes: list[Outcome] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        if dry:  # one thread per process: the dry run's CPU steps run side by side on few cores
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self.info: dict = {}
        self.background: dict = {}

    # --- running things ---------------------------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self.out / "logs" / f"{STEPS.index(name)}-{name}.log"

    def limit(self, name: str) -> float:
        return max(1.0, min(LIMITS[name], self.deadline - time.monotonic()))

    def start(self, argv: list[str], log: Path, outcome: Outcome) -> subprocess.Popen:
        outcome.commands.append(shlex.join(argv) if argv[:2] != [self.python, "-c"] else "python -c ...")
        f = open(log, "a")
        f.write(f"$ {outcome.commands[-1]}\n")
        f.flush()
        # a session of its own, so that a timeout stops the command's children too (--isolate, compile workers)
        try:
            return subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            f.close()  # the child holds its own descriptor

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float) -> int | None:
        """The exit code, or None after stopping the process group at its time limit."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return None

    def run(self, argv: list[str], outcome: Outcome, log: Path, timeout: float) -> int | None:
        return self.finish(self.start(argv, log, outcome), timeout)

    def stbench(self, commands: list[list[str]]) -> list[str]:
        return [self.python, "-c", _BATCH, json.dumps(commands)]

    def launch(self, name: str) -> None:
        """Start a step's main process now; the step waits for it when its turn comes."""
        outcome = Outcome(name)
        self.background[name] = (self.start(self.main_argv(name), self.log_path(name), outcome), outcome,
                                 time.monotonic())

    def run_main(self, name: str, outcome: Outcome, log: Path, timeout: float) -> int | None:
        """The step's main process: waited for where it was launched earlier, else run now."""
        if name not in self.background:
            return self.run(self.main_argv(name), outcome, log, timeout)
        proc, early, t0 = self.background.pop(name)
        outcome.commands += early.commands
        rc = self.finish(proc, timeout)
        outcome.note = f"started {time.monotonic() - t0:.0f} s before, beside other steps"
        return rc

    def main_argv(self, name: str) -> list[str]:
        if name == "predict":
            out = str(self.out / "predict")
            return self.stbench([["predict", *g.case_flags(self.dry), "--hardware", self.info["hardware"], "--resume",
                                  "--out", out] for g in self.groups()])
        if name == "attention":
            flags = ATTENTION_DRY if self.dry else ATTENTION_GPU
            return self.stbench([["attention", *flags, *SPARSITIES, "--out", str(self.out / "attention")]])
        if name == "bandwidth":
            return [self.python, str(REPO / "scripts" / "hbm_bandwidth.py"), *(BANDWIDTH_DRY if self.dry else
                                                                               BANDWIDTH_GPU),
                    "--out", str(self.out / "hbm-bandwidth.jsonl")]
        if name == "suites":
            return [self.python, "-m", "pytest", "suites", "--benchmark-only", "-q", "-rs", "-p", "no:cacheprovider",
                    *(SUITES_DRY if self.dry else SUITES_GPU), "--stbench-out",
                    str(self.out / "suites" / "results.jsonl"), "--benchmark-json",
                    str(self.out / "suites-benchmark.json")]
        raise KeyError(name)

    def step(self, name: str, fn, *, needs_cuda: bool = False) -> Outcome:
        outcome = Outcome(name)
        log = self.log_path(name)
        self.outcomes.append(outcome)
        t0 = time.monotonic()
        if needs_cuda and self.dry:
            outcome.status, outcome.note = "skipped", "needs CUDA (dry run)"
        elif self.deadline - time.monotonic() < 5:
            outcome.status, outcome.note = "FAILED", "not started: the check's deadline has passed"
        elif any(o.status == "FAILED" and o.name in ("setup", "env") for o in self.outcomes[:-1]):
            outcome.status, outcome.note = "FAILED", "not started: setup or env failed"
        else:
            try:
                note = fn(outcome, log, self.limit(name))
                outcome.status, outcome.note = "ok", note or ""
            except StepFailed as e:
                outcome.status, outcome.note = "FAILED", str(e)
        outcome.seconds = time.monotonic() - t0
        budget = "" if self.dry else f" (limit {LIMITS[name]} s, H100 estimate {ESTIMATES[name]} s)"
        print(f"gpu_check: {name:9s} {outcome.status:7s} {outcome.seconds:6.1f} s{budget}"
              + (f"  {outcome.note}" if outcome.note else ""), flush=True)
        if outcome.status == "FAILED" and log.exists():
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print("\n".join(f"    | {line}" for line in tail), flush=True)
        return outcome

    def check_rc(self, rc: int | None, what: str) -> None:
        if rc is None:
            raise StepFailed(f"{what}: stopped at its time limit")
        if rc != 0:
            raise StepFailed(f"{what}: exit code {rc}")

    # --- the steps ----------------------------------------------------------------------------------------------

    def setup(self, outcome, log, timeout):
        wheels = sorted(self.wheels.glob("*.whl")) if self.wheels.is_dir() else []
        notes = []
        for dist in WHEEL_DISTS:
            found = [w.name for w in wheels if w.name.lower().startswith(dist + "-")]
            if len(found) > 1:
                raise StepFailed(f"{self.wheels}: {len(found)} wheels of {dist} ({', '.join(found)}); keep one")
        if wheels and not self.dry:
            rc = self.run([self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(self.site), *map(str, wheels)],
                          outcome, log, timeout)
            self.check_rc(rc, "pip install")
            self.env["PYTHONPATH"] = os.pathsep.join([str(self.site), self.env["PYTHONPATH"]])
            notes.append(f"{len(wheels)} wheels from {self.wheels} installed in {self.site}")
        elif wheels:
            notes.append(f"{len(wheels)} wheels in {self.wheels} (a dry run installs nothing)")
        else:
            notes.append(f"no wheels in {self.wheels}: this interpreter's packages")
        return "; ".join(notes)  # the env step imports every package

    def environment(self, outcome, log, timeout):
        with open(self.out / "env.txt", "w") as f:
            if shutil.which("nvidia-smi"):
                f.write("$ nvidia-smi\n")
                f.flush()
                subprocess.run(["nvidia-smi"], stdout=f, stderr=subprocess.STDOUT, timeout=30)
        probe = self.out / "env.json"
        rc = self.run([self.python, "-c", _ENV, "dry" if self.dry else "gpu", str(probe)], outcome, log, timeout)
        self.check_rc(rc, "environment probe")
        self.info = json.loads(probe.read_text())
        if not self.dry:
            if not self.info["cuda_available"]:
                raise StepFailed("torch sees no CUDA device (use --dry-run on a machine without one)")
            override = os.environ.get("GPU_CHECK_HARDWARE")
            if override:
                self.info["hardware"] = override
            if not self.info["hardware"]:
                raise StepFailed(f"{self.info['gpu']!r} matches no entry of stbench/predict/hardware.py; set "
                                 f"GPU_CHECK_HARDWARE=<name> to predict for one")
            return f"{self.info['gpu']} -> {self.info['slug']}, predicted as {self.info['hardware']}"
        self.info["hardware"] = "h100-sxm,cpu"  # a dry run predicts for an H100 (unpaired) and the CPU (paired)
        return f"no GPU (dry run): slug {self.info['slug']}, predicted for {self.info['hardware']}"

    def groups(self) -> list[Group]:
        return [g for g in GROUPS if g.needs is None or g.needs in self.info.get("run_flags", [])]

    def pytest_cuda(self, outcome, log, timeout):
        junit = self.out / "pytest-cuda.xml"
        rc = self.run([self.python, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                       f"--junitxml={junit}"], outcome, log, timeout)
        self.check_rc(rc, "pytest -m cuda")
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
        if tests == 0 or skipped:
            raise StepFailed(f"{tests} CUDA tests, {skipped} skipped: every CUDA test must run on a GPU")
        return f"{tests} CUDA tests passed"

    def quiet(self) -> str:
        """On the GPU, wait for background work (the predictions) before anything is timed: a process beside
        the sweep would be counted as load in its records."""
        if self.dry or "predict" not in self.background:
            return ""
        proc, _, t0 = self.background["predict"]
        waited = time.monotonic()
        self.finish(proc, max(1.0, LIMITS["pytest"] + LIMITS["predict"] - (waited - t0)))
        waited = time.monotonic() - waited
        return f"; waited {waited:.0f} s for the predictions first" if waited >= 1 else ""

    def sweep(self, outcome, log, timeout):
        waited = self.quiet()
        timeout = self.limit("sweep")  # the sweep's own limit starts after the wait
        out = str(self.out / "sweep")
        device = "cpu" if self.dry else "cuda"
        repeats = ["--repeats", "2", "--warmup", "2"] if self.dry else ["--repeats", "10"]
        repeats += ["--rounds", "1"]  # run's default for several cases is now 12 rounds (issue 23): one round here
        commands = []
        for g in self.groups():
            # --isolate (a process per case, as the GPU workflow runs its sweep); the dry run isolates only the
            # LoRA group, each child's interpreter start being most of a tiny case's time
            isolate = ["--isolate"] if not self.dry or g.needs else []
            commands.append(["run", *g.case_flags(self.dry), "--device", device, *repeats, *isolate,
                             *(["--trace"] if g.trace else []), "--no-progress", "--resume", "--out", out])
        left_out = [g.name for g in GROUPS if g not in self.groups()]
        rc = self.run(self.stbench(commands), outcome, log, timeout)
        self.check_rc(rc, "stbench run")
        records = _records(self.out / "sweep")
        expected = sum(g.cases(self.dry) for g in self.groups())
        bad = [f"{r['arch']}: {r['status']}" for r in records if r["status"] != "ok"]
        if bad or len(records) < expected:
            raise StepFailed(f"{len(records)} of {expected} cases recorded; not ok: {', '.join(bad) or 'none'}")
        traced = [r for r in records if r.get("trace")]
        if not traced:
            raise StepFailed("no case has a trace")
        return (f"{len(records)} cases ok, trace of {len(traced)}" + waited
                + (f"; left out: {', '.join(left_out)} (this stbench has no --lora)" if left_out else ""))

    def predict(self, outcome, log, timeout):
        self.check_rc(self.run_main("predict", outcome, log, timeout), "stbench predict")
        errors = [f"{r['arch']} on {r['device']}" for r in _records(self.out / "predict") if r["status"] == "error"]
        if errors:
            raise StepFailed(f"predictions failed: {', '.join(errors)}")
        table = self.out / "predict-vs-measured.txt"
        rc = self.run([self.python, "-m", "stbench.predicted_vs_measured", str(self.out / "predict"),
                       str(self.out / "sweep"), "-o", str(table), "--csv", str(table.with_suffix(".csv"))],
                      outcome, log, timeout)
        self.check_rc(rc, "predicted-vs-measured table")
        return f"{table.name} ({outcome.note})" if outcome.note else table.name

    def attention(self, outcome, log, timeout):
        self.check_rc(self.run_main("attention", outcome, log, timeout), "stbench attention")
        records = _records(self.out / "attention")
        bad = [r for r in records if r["status"] != "ok"]
        if bad or not records:
            raise StepFailed(f"{len(records)} attention records, {len(bad)} not ok")
        speedups = [f"s={r['attention']['sparsity']} {r['attention']['speedup']:.2f}x"
                    for r in records if (r.get("attention") or {}).get("speedup") is not None]
        if self.dry:
            return f"gather vs SDPA (CPU, one sample each: wiring only): speed-up {', '.join(speedups)}"
        return f"FlexAttention vs SDPA: speed-up {', '.join(speedups)}"

    def bandwidth(self, outcome, log, timeout):
        self.check_rc(self.run_main("bandwidth", outcome, log, timeout), "scripts/hbm_bandwidth.py")
        rows = [json.loads(line) for line in (self.out / "hbm-bandwidth.jsonl").read_text().splitlines()]
        largest = max(r["elements"] for r in rows)
        if self.dry:
            return f"{len(rows)} kernel timings (CPU: wiring only)"
        return "of the datasheet at the largest size: " + ", ".join(
            f"{r['kind']} {r['fraction_of_datasheet']:.2f}" for r in rows
            if r["elements"] == largest and r["fraction_of_datasheet"] is not None)

    def suites(self, outcome, log, timeout):
        self.check_rc(self.run_main("suites", outcome, log, timeout), "pytest suites")
        return f"{len(_records(self.out / 'suites'))} suite cases"

    def gate(self, outcome, log, timeout):
        out, slug = self.out, self.info["slug"]
        committed = REPO / "reports" / "baselines" / slug
        commands = [["gate", "--baseline", str(out / "suites-benchmark.json"),
                     "--current", str(out / "suites-benchmark.json"), "--markdown", str(out / "gate.md")],
                    ["gate", "--baseline", str(out / "sweep"), "--current", str(out / "sweep"),
                     "--markdown", str(out / "gate.md")]]
        note = "A/A passed (suites, sweep)"
        if not self.dry and (committed / "results.jsonl").exists():
            commands.append(["gate", "--baseline", str(committed / "results.jsonl"), "--current", str(out / "sweep"),
                             "--markdown", str(out / "gate.md")])
            note += f"; gated against {committed.relative_to(REPO)}"
        commands.append(["report", str(out / "sweep"), "-o", str(out / "sweep" / "report.html"),
                         "--title", f"stbench GPU check on {self.info['gpu'] or 'the CPU (dry run)'}"])
        rc = self.run(self.stbench(commands), outcome, log, timeout)
        baseline = out / "reports" / "baselines" / slug  # written even after a regression, to look at
        baseline.mkdir(parents=True, exist_ok=True)
        for src, name in ((out / "sweep" / "results.jsonl", "results.jsonl"), (out / "sweep" / "run.json", "run.json"),
                          (out / "sweep" / "report.html", "report.html"),
                          (out / "suites-benchmark.json", "suites-benchmark.json"),
                          (out / "predict-vs-measured.txt", "predict-vs-measured.txt"),
                          (out / "hbm-bandwidth.jsonl", "hbm-bandwidth.jsonl")):
            if src.exists():
                shutil.copyfile(src, baseline / name)
        self.check_rc(rc, "stbench gate / report")
        return f"{note}; baseline files in {baseline.relative_to(out)}/"

    # --- summary --------------------------------------------------------------------------------------------------

    def summary(self, argv: list[str], started: float) -> int:
        failed = [o for o in self.outcomes if o.status == "FAILED"]
        where = "dry run on the CPU" if self.dry else self.info.get("gpu") or "no GPU found"
        lines = [f"stbench GPU check: {where}",
                 f"command: bash scripts/gpu_check.sh {shlex.join(argv)}",
                 f"total: {time.monotonic() - started:.1f} s; {'FAILED' if failed else 'every step ran'}", "",
                 f"{'step':10s} {'status':8s} {'seconds':>8s}  note"]
        lines += [f"{o.name:10s} {o.status:8s} {o.seconds:8.1f}  {o.note}" for o in self.outcomes]
        table = self.out / "predict-vs-measured.txt"
        if table.exists():
            lines += ["", table.read_text().rstrip()]
        text = "\n".join(lines) + "\n"
        (self.out / "summary.txt").write_text(text)
        (self.out / "steps.json").write_text(json.dumps(
            {"dry_run": self.dry, "env": self.info, "steps": [o.__dict__ for o in self.outcomes]}, indent=1) + "\n")
        print("\n" + text, end="")
        return 1 if failed else 0


class StepFailed(Exception):
    """A step ran but did not do all it must (the message says what)."""


def _records(run: Path) -> list[dict]:
    """The last record per case of a run folder (stdlib only: stbench's own reader is for the children)."""
    path = run / "results.jsonl"
    by_key = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        key = json.dumps({k: record.get(k) for k in ("arch", "preset", "overrides", "mode", "resolution", "frames",
                                                      "batch", "dtype", "device", "lora")}, sort_keys=True)
        by_key[key] = record
    return list(by_key.values())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny presets; CUDA steps skipped")
    parser.add_argument("out", help="folder for everything the check writes (created; must be empty or absent)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        print(f"gpu_check: error: {out} is not empty (choose a new folder)", file=sys.stderr)
        return 2
    (out / "logs").mkdir(parents=True, exist_ok=True)
    python = os.environ.get("PYTHON") or sys.executable
    wheels = Path(os.environ.get("GPU_CHECK_WHEELS") or REPO / ".whl")
    site = Path(os.environ.get("GPU_CHECK_SITE") or Path(os.environ.get("TMPDIR", "/tmp")) / "stbench-gpu-site")
    deadline = float(os.environ.get("GPU_CHECK_DEADLINE_S") or DEADLINE_S)
    check = Check(out, args.dry_run, python, wheels, site, deadline)
    started = time.monotonic()
    print(f"gpu_check: {'dry run' if args.dry_run else 'GPU check'} -> {out}", flush=True)
    check.step("setup", check.setup)
    if args.dry_run and all(o.status == "ok" for o in check.outcomes):
        for name in DRY_EARLY:
            check.launch(name)
    check.step("env", check.environment)
    if all(o.status == "ok" for o in check.outcomes):
        for name in DRY_BACKGROUND if args.dry_run else ("predict",):
            if name not in check.background:
                check.launch(name)
    check.step("pytest", check.pytest_cuda, needs_cuda=True)
    check.step("sweep", check.sweep)
    check.step("predict", check.predict)
    check.step("attention", check.attention)
    check.step("bandwidth", check.bandwidth)
    check.step("suites", check.suites)
    check.step("gate", check.gate)
    for proc, _, _ in check.background.values():  # a background step whose wait was never reached
        check.finish(proc, 0)
    return check.summary(argv, started)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

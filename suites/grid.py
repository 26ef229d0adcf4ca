"""The suites' grids: which stbench cases each family runs, following the device; narrowed by options/env."""
from __future__ import annotations

import os
from dataclasses import dataclass

import architectures
from stbench.config import parse_set_options
from stbench.errors import UserError

UNET_ARCHS = ("serial-unet", "mobius-unet", "mobius-ladder-unet", "modelscope-unet")
DIT_ARCHS = ("dit-full", "dit-window", "dit-serial-st", "dit-parallel-st", "dit-dsv")
VIDEO_TRANSFORMER_ARCHS = ("wan", "cogvideox", "hunyuan-video", "ltx-video", "latte", "mochi")
FAMILY_ARCHS = {"unet": UNET_ARCHS, "dit": DIT_ARCHS, "video-transformer": VIDEO_TRANSFORMER_ARCHS}
# UNets are measured in both Mobius settings; the DiTs (DSV) and the video transformers train every layer.
FAMILY_MODES = {"unet": ("temporal", "full"), "dit": ("full",), "video-transformer": ("full",)}
# The video transformers take only the frame counts and sizes their VAEs map onto whole patches, so without
# --stbench-resolution/--stbench-frames each runs at its own shape: (preset, resolution, frames) per grid.
# Full grid: Wan2.1 1.3B and CogVideoX 2B at their trained frame counts (81, 49) and 480-pixel height, square
# because a Case has one resolution (their trained frames are 832x480 and 720x480).
NATIVE_SHAPES = {
    "tiny": {"wan": ("tiny", 64, 9), "cogvideox": ("tiny", 64, 9), "hunyuan-video": ("tiny", 64, 9),
             "ltx-video": ("tiny", 128, 9), "latte": ("tiny", 64, 8), "mochi": ("tiny", 64, 7)},
    "full": {"wan": ("1.3b", 480, 81), "cogvideox": ("2b", 480, 49)},
}
GRIDS = ("tiny", "full")
FULL_PRESETS = {"unet": "sd15", "dit": "0.8b"}  # SD1.5 + AnimateDiff; DSV's 0.8B DiT

# option name -> (env var, help); every value is a comma-separated list unless it names one thing
OPTIONS = {
    "arch": ("STBENCH_ARCH", "comma-separated architectures (default: every registered one of each suite)"),
    "device": ("STBENCH_DEVICE", "cpu | cuda | cuda:N (default: cuda when available)"),
    "grid": ("STBENCH_GRID", "tiny | full (default: full on CUDA, tiny on CPU)"),
    "out": ("STBENCH_OUT", "stbench results file the records are appended to (default runs/suites/results.jsonl)"),
    "preset": ("STBENCH_PRESET", "preset for every architecture (default: the grid's)"),
    "mode": ("STBENCH_MODE", "comma-separated training modes (default: temporal,full for UNets, full for DiTs)"),
    "resolution": ("STBENCH_RESOLUTION", "comma-separated resolutions in pixels"),
    "frames": ("STBENCH_FRAMES", "comma-separated frame counts"),
    "batch": ("STBENCH_BATCH", "comma-separated batch sizes"),
    "dtype": ("STBENCH_DTYPE", "fp32 | bf16 | fp16 (default: bf16 on the full grid, fp32 on tiny)"),
    "set": ("STBENCH_SET", "KEY=VALUE config override for every case (repeatable; env: space-separated)"),
    "rounds": ("STBENCH_ROUNDS", "measured rounds per benchmark (default: 10 on the full grid, 5 on tiny)"),
    "warmup": ("STBENCH_WARMUP", "unmeasured warm-up rounds per benchmark (default 2)"),
    "weights": ("STBENCH_WEIGHTS", "trained | PATH: starting weights of every case (default: random)"),
}
DEFAULT_OUT = "runs/suites/results.jsonl"


@dataclass(frozen=True)
class GridSpec:
    """The values a family's grid is the product of."""

    device: str
    grid: str
    archs: tuple[str, ...] | None  # None: every registered architecture of the family
    preset: str | None  # None: tiny on the tiny grid, the family's full-size preset on the full grid
    modes: tuple[str, ...] | None
    resolutions: tuple[int, ...]
    frames: tuple[int, ...]
    batches: tuple[int, ...]
    dtype: str
    rounds: int
    warmup: int
    out: str
    overrides: tuple[tuple[str, str], ...] = ()  # raw --set pairs, as in stbench.config.Case
    native_shapes: bool = True  # no resolution/frames given: the video transformers use NATIVE_SHAPES
    weights: str | None = None  # as stbench.config.Case.weights


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None or not text.strip():
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(name: str, text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    parts = _split(text)
    if parts is None:
        return default
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--stbench-{name}: expected comma-separated integers, got {text!r}") from None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def grid_spec(get) -> GridSpec:
    """Build the grid from `get(name) -> str | None` (the command-line option, else the env var)."""
    device = get("device") or ("cuda" if cuda_available() else "cpu")
    grid = get("grid") or ("full" if device.startswith("cuda") else "tiny")
    if grid not in GRIDS:
        raise ValueError(f"--stbench-grid: {grid!r} is not legal; legal: {', '.join(GRIDS)}")
    full = grid == "full"
    rounds = _ints("rounds", get("rounds"), (10 if full else 5,))[0]
    warmup = _ints("warmup", get("warmup"), (2,))[0]
    sets = get("set") or ()
    if isinstance(sets, str):
        sets = sets.split()
    try:
        overrides = parse_set_options(sets)
    except UserError as e:
        raise ValueError(f"--stbench-set: {e}") from None
    if rounds < 1 or warmup < 0:
        raise ValueError(f"--stbench-rounds must be >= 1 and --stbench-warmup >= 0, got {rounds}, {warmup}")
    return GridSpec(
        device=device, grid=grid, archs=_split(get("arch")), preset=get("preset") or None,
        modes=_split(get("mode")),
        resolutions=_ints("resolution", get("resolution"), (256, 512) if full else (64,)),
        frames=_ints("frames", get("frames"), (8, 16, 24) if full else (4, 8)),
        batches=_ints("batch", get("batch"), (1, 2) if full else (1,)),
        dtype=get("dtype") or ("bf16" if full else "fp32"),
        rounds=rounds, warmup=warmup, out=get("out") or DEFAULT_OUT, overrides=overrides,
        native_shapes=get("resolution") is None and get("frames") is None,
        weights=get("weights") or None)


def env_get(name: str) -> str | None:
    return os.environ.get(OPTIONS[name][0]) or None


def full_preset(arch: str) -> str | None:
    """The full-size preset of a registered architecture (sd15 for UNets, DSV's 0.8B size for DiTs)."""
    spec = architectures.get(arch)
    if FULL_PRESETS.get(spec.family) in spec.presets:
        return FULL_PRESETS[spec.family]
    larger = [p for p in spec.presets if p not in ("tiny", "small")]
    return larger[0] if larger else None


def check_archs(spec: GridSpec) -> None:
    """Refuse a name in --stbench-arch that is not registered."""
    registered = set(architectures.names())
    unknown = [a for a in spec.archs or () if a not in registered]
    if unknown:
        raise ValueError(f"--stbench-arch: unknown architecture {unknown[0]!r}; registered: "
                         f"{', '.join(sorted(registered))}")


@dataclass(frozen=True)
class GridEntry:
    """One parameter of a suite: a valid case, or why this point of the grid is skipped."""

    id: str
    case: object | None  # stbench.config.Case
    skip_reason: str | None = None


def family_entries(family: str, spec: GridSpec) -> list[GridEntry]:
    """Every point of a family's grid: cases in a stable order, with stable ids (results.case_slug)."""
    from stbench.config import Case
    from stbench.results import case_slug

    check_archs(spec)
    wanted = spec.archs if spec.archs is not None else FAMILY_ARCHS[family]
    entries = []
    for arch in wanted:
        if architectures.get(arch).family != family:
            continue
        preset = spec.preset or ("tiny" if spec.grid == "tiny" else full_preset(arch))
        resolutions, frame_counts = spec.resolutions, spec.frames
        if family == "video-transformer" and spec.native_shapes:
            native = NATIVE_SHAPES[spec.grid].get(arch)
            if native is None:
                entries.append(GridEntry(f"{arch}-not-in-{spec.grid}-grid", None,
                                         f"{arch} has no {spec.grid}-grid shape (ask with --stbench-arch and a shape)"))
                continue
            preset, resolutions, frame_counts = spec.preset or native[0], (native[1],), (native[2],)
        if preset is None:
            entries.append(GridEntry(f"{arch}-no-full-preset", None, f"{arch} has no full-size preset"))
            continue
        for mode in spec.modes or FAMILY_MODES[family]:
            for resolution in resolutions:
                for frames in frame_counts:
                    for batch in spec.batches:
                        identity = dict(arch=arch, preset=preset, mode=mode, batch=batch, frames=frames,
                                        resolution=resolution, dtype=spec.dtype, device=spec.device)
                        slug = case_slug({**identity, "compile": False, "overrides": dict(spec.overrides),
                                          "weights": spec.weights})
                        try:
                            entries.append(GridEntry(slug, Case(**identity, overrides=spec.overrides,
                                                                weights=spec.weights)))
                        except UserError as e:  # e.g. a shape this architecture cannot take
                            entries.append(GridEntry(slug, None, str(e)))
    return entries

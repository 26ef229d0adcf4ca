"""Starting weights of a case: the committed checkpoint of its family and preset, a user's state dict, or the
shared random initialisation that makes every architecture of one `train` command start alike."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

import architectures

from .overrides import parse_override_value
from .errors import UserError

CHECKPOINT_DIR = Path(architectures.__file__).resolve().parent / "checkpoints"
TRAINED = "trained"
# the architecture whose parameters a family's checkpoint holds; others load the names they share with it
REFERENCE_ARCH = {"unet": "serial-unet", "dit": "dit-full"}
SHOWN_KEYS = 3


def checkpoint_path(arch: str, preset: str) -> Path:
    return CHECKPOINT_DIR / f"{architectures.get(arch).family}-{preset}.pt"


def resolve(case: Case) -> Path:
    """The file `case.weights` names; a missing file is a UserError naming it."""
    if case.weights == TRAINED:
        path = checkpoint_path(case.arch, case.preset)
        if not path.is_file():
            have = sorted(p.stem for p in CHECKPOINT_DIR.glob("*.pt"))
            raise UserError(f"--weights trained: no committed checkpoint for {case.arch} preset {case.preset} "
                            f"({path.name}); committed: {', '.join(have) or 'none'}")
        return path
    path = Path(case.weights)
    if not path.is_file():
        raise UserError(f"--weights {case.weights}: no such file")
    return path


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int) -> tuple[dict, dict]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UserError(f"--weights {path}: not a torch state dict ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        state, meta = data["state_dict"], data.get("meta") or {}
    else:
        state, meta = data, {}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path}: not a state dict (a mapping of parameter names to tensors)")
    return state, meta


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(state dict, metadata) of a checkpoint file written by `save_checkpoint` or a plain state dict."""
    return _read(str(path), os.stat(path).st_mtime_ns)


def save_checkpoint(model, path: str | os.PathLike, meta: dict) -> None:
    """Write atomically: a killed save never leaves a half-written checkpoint under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}, tmp)
    os.replace(tmp, path)


def _config(arch: str, case: Case):
    typed = {k: parse_override_value(architectures.get(arch).config_cls, k, v) for k, v in case.overrides}
    return architectures.make_config(arch, case.preset, **typed)


def reference_arch(case: Case) -> str:
    """The family's reference architecture when it shares the case's config class, else the case's own."""
    arch = architectures.get(case.arch)
    ref = REFERENCE_ARCH.get(arch.family, case.arch)
    return ref if architectures.get(ref).config_cls is arch.config_cls else case.arch


def _meta_state(arch: str, config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = architectures.get(arch).build(config)
    return {k: v.shape for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=32)
def _expected(case: Case) -> tuple[dict, frozenset]:
    """Parameter shapes of the case's model, and the names its family's checkpoint need not hold (additions
    such as the ladder's bridges or DSV's estimators, which start from their own initialisation)."""
    own = _meta_state(case.arch, case.model_config())
    ref = reference_arch(case)
    shared = own if ref == case.arch else _meta_state(ref, _config(ref, case))
    return own, frozenset(set(own) - set(shared))


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:SHOWN_KEYS]) + (f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")


def validate(case: Case) -> dict:
    """The checkpoint's state dict after checking it fits the case; a UserError naming the problem if not."""
    path = resolve(case)
    state, meta = read_checkpoint(path)
    family = architectures.get(case.arch).family
    label = f"--weights {case.weights}" + (f" ({path.name})" if case.weights == TRAINED else "")
    if meta.get("family") not in (None, family) or meta.get("preset") not in (None, case.preset):
        raise UserError(f"{label}: checkpoint of the {meta.get('family')} family, preset {meta.get('preset')}; "
                        f"{case.arch} needs family {family}, preset {case.preset}")
    own, additions = _expected(case)
    unexpected = set(state) - set(own)
    missing = set(own) - set(state) - additions
    wrong = [k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k])]
    if unexpected:
        raise UserError(f"{label}: keys not in {case.arch} ({case.preset}): {_names(unexpected)}")
    if missing:
        raise UserError(f"{label}: keys of {case.arch} ({case.preset}) missing: {_names(missing)}")
    if wrong:
        k = sorted(wrong)[0]
        raise UserError(f"{label}: shape mismatch for {k}: checkpoint {tuple(state[k].shape)}, "
                        f"{case.arch} {tuple(own[k])} ({len(wrong)} key(s) differ)")
    return state


def load_weights(model, case: Case) -> None:
    """Load `case.weights` into `model`; every checkpoint key is used, only the architecture's additions keep
    their initialisation."""
    result = model.load_state_dict(validate(case), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # validate() checked; a model built differently


def share_initial_weights(model, case: Case, seed: int) -> None:
    """Overwrite the parameters `model` shares (by name and shape) with the family's reference architecture
    built from `seed`, so that every architecture of one command starts from the same random weights."""
    ref = reference_arch(case)
    if ref == case.arch:
        return
    torch.manual_seed(seed)
    with torch.device("cpu"):
        reference = architectures.get(ref).build(_config(ref, case))
    own = model.state_dict()
    shared = {k: v for k, v in reference.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)

"""Starting weights of a case: the committed checkpoint of its family and preset, a user's state dict, or the
shared random initialisation that makes every architecture of one `train` command start alike."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

import architectures
from architectures.attention.dsv import DSVAttention

from .overrides import parse_override_value
from .errors import UserError

CHECKPOINT_DIR = Path(architectures.__file__).resolve().parent / "checkpoints"
TRAINED = "trained"
# the architecture whose parameters a family's checkpoint holds; others load the names they share with it
REFERENCE_ARCH = {"unet": "serial-unet", "dit": "dit-full"}
SHOWN_KEYS = 3
DSV_OWN_STATE = ("q_estimator", "k_estimator", "profiled_sparsity", "profile_updates")  # DSVAttention's own state


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


def _meta_model(arch: str, config):
    with torch.device("meta"):
        return architectures.get(arch).build(config)


def _meta_state(arch: str, config) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in _meta_model(arch, config).state_dict().items()}


def dsv_state_names(model) -> frozenset:
    """State-dict names of every DSV layer's estimator parameters and profile buffers: what a dense model's
    checkpoint lacks and DSV learns itself (its workflow starts from a dense model, arXiv 2502.07590)."""
    return frozenset(f"{name}.{key}" for name, m in model.named_modules() if isinstance(m, DSVAttention)
                     for key in DSV_OWN_STATE)


@functools.lru_cache(maxsize=32)
def _expected(case: Case) -> tuple[dict, frozenset, frozenset]:
    """Parameter shapes of the case's model, the names its family's checkpoint need not hold (additions
    such as the ladder's bridges or DSV's estimators, which start from their own initialisation), and the names
    of its DSV state (estimators and profiles), which a dense checkpoint of the same architecture lacks."""
    model = _meta_model(case.arch, case.model_config())
    own = {k: v.shape for k, v in model.state_dict().items()}
    ref = reference_arch(case)
    shared = own if ref == case.arch else _meta_state(ref, _config(ref, case))
    return own, frozenset(set(own) - set(shared)), dsv_state_names(model)


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:SHOWN_KEYS]) + (f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")


def validate(case: Case) -> dict:
    """The checkpoint's state dict after checking it fits the case; a UserError naming the problem if not."""
    return _checked(case)[0]


def _checked(case: Case) -> tuple[dict, frozenset]:
    """(state dict, the DSV state names it lacks and that start fresh) after checking it fits the case."""
    path = resolve(case)
    state, meta = read_checkpoint(path)
    family = architectures.get(case.arch).family
    label = f"--weights {case.weights}" + (f" ({path.name})" if case.weights == TRAINED else "")
    if meta.get("family") not in (None, family) or meta.get("preset") not in (None, case.preset):
        raise UserError(f"{label}: checkpoint of the {meta.get('family')} family, preset {meta.get('preset')}; "
                        f"{case.arch} needs family {family}, preset {case.preset}")
    own, additions, dsv = _expected(case)
    unexpected = set(state) - set(own)
    fresh = dsv - set(state)
    if fresh and fresh != dsv and not fresh <= additions:  # some layers' DSV state but not all: not a dense model's
        raise UserError(f"{label}: keys of {case.arch} ({case.preset}) missing: {_names(fresh)} (the checkpoint "
                        f"holds DSV state for other layers; a dense checkpoint holds none)")
    missing = set(own) - set(state) - additions - fresh
    wrong = [k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k])]
    if unexpected:
        raise UserError(f"{label}: keys not in {case.arch} ({case.preset}): {_names(unexpected)}")
    if missing:
        raise UserError(f"{label}: keys of {case.arch} ({case.preset}) missing: {_names(missing)}")
    if wrong:
        k = sorted(wrong)[0]
        raise UserError(f"{label}: shape mismatch for {k}: checkpoint {tuple(state[k].shape)}, "
                        f"{case.arch} {tuple(own[k])} ({len(wrong)} key(s) differ)")
    return state, frozenset(fresh)


def load_weights(model, case: Case) -> None:
    """Load `case.weights` into `model`; every checkpoint key is used, only the architecture's additions keep
    their initialisation. DSV state the checkpoint lacks (a dense model's) starts fresh, and every DSV layer's
    warnings, which reach the case's record, say so."""
    state, fresh = _checked(case)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # validate() checked; a model built differently
    if fresh:
        layers = {name.rsplit(".", 1)[0] for name in fresh}
        note = (f"weights: {case.weights} holds no DSV estimator or sparsity profile for {len(layers)} layer(s) "
                f"(a dense model's checkpoint): they start fresh (random estimator, empty profile), as DSV "
                f"training from a dense model does")
        for name, m in model.named_modules():
            if isinstance(m, DSVAttention) and note not in m.warnings:
                m.warnings.append(note)


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

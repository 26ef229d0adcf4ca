"""Shared fixtures: a toy video model registered under test-only names, and a CLI launcher that knows it."""
from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import architectures
from architectures import Architecture, VideoModel
from stbench.measure.memory import collect_and_freeze

REPO = Path(__file__).resolve().parent.parent
TOY_ARCH = "toy-mlp"
# Two shared cores: the processes tests start (stbench commands, ranks, --isolate's children) run one intra-op
# thread too; two would spin at OpenMP's barriers while the machine's other work holds a core (a tiny UNet step:
# 5 s instead of 40 ms)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def child_env(drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """The environment for a child that may start a pytest session of its own: without a pytest-xdist worker's
    variables (README's `-n 2`), which would make pytest-benchmark disable itself and refuse --benchmark-only;
    without the variables whose names start with one of `drop`; with `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", *drop))}
    return {**env, **extra}


@dataclass(frozen=True)
class ToyConfig:
    """Per-pixel MLP sizes, plus a fault to inject for runner tests."""

    hidden: int = 8
    text_dim: int = 8
    fail: str = "none"  # none | oom | error | exit | segfault: what the forward pass does instead
    fail_batch: int = 0  # inject the fault only for this batch size (0: every batch size)
    sleep_ms: float = 0.0  # a slow forward, so a test can interrupt a sweep between cases


class ToyVideoModel(VideoModel):
    """Linear -> ReLU -> Linear over the channels of every latent pixel: spatial, then temporal layer."""

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.spatial = nn.Linear(self.latent_channels, config.hidden)
        self.temporal = nn.Linear(config.hidden, self.latent_channels)

    @property
    def text_dim(self) -> int:
        return self.config.text_dim

    def group_of(self, parameter_name: str) -> str:
        return parameter_name.split(".")[0]

    def _inject_fault(self, batch: int) -> None:
        fail = self.config.fail
        if fail == "none" or (self.config.fail_batch and batch != self.config.fail_batch):
            return
        if fail == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by a test)")
        if fail == "error":
            raise RuntimeError("injected model error")
        if fail == "exit":
            sys.stderr.write("toy: leaving with os._exit(3)\n")
            sys.stderr.flush()
            os._exit(3)
        if fail == "segfault":
            ctypes.string_at(0)

    def forward(self, sample, timesteps, text):  # (B,C,F,h,w), (B,), (B,L,D) -> (B,C,F,h,w)
        self._inject_fault(sample.shape[0])
        if self.config.sleep_ms:
            time.sleep(self.config.sleep_ms / 1e3)
        x = sample.permute(0, 2, 3, 4, 1)  # (B, F, h, w, C)
        x = torch.relu(self.spatial(x))  # (B, F, h, w, H)
        x = self.temporal(x)  # (B, F, h, w, C)
        return x.permute(0, 4, 1, 2, 3)  # (B, C, F, h, w)


def _check_shape(config, frames, height, width):
    if frames > 64:
        raise ValueError(f"toy model takes at most 64 frames, got {frames}")


if TOY_ARCH not in architectures.registry._REGISTRY:
    architectures.register(Architecture(
        name=TOY_ARCH, family="unet", config_cls=ToyConfig, presets={"tiny": ToyConfig, "small": lambda: ToyConfig(32)},
        build=ToyVideoModel, description="test-only per-pixel MLP", check_shape=_check_shape))

# Run `python -m stbench ...` in a child process with the toy architecture registered (this file re-imported).
_LAUNCHER = ("import importlib.util, sys; "
             "spec = importlib.util.spec_from_file_location('conftest', sys.argv[1]); "
             "mod = importlib.util.module_from_spec(spec); sys.modules['conftest'] = mod; spec.loader.exec_module(mod); "
             "from stbench.cli import main; sys.exit(main(sys.argv[2:]))")


def stbench_command(*args: str) -> list[str]:
    """argv for a child `stbench` that also knows the toy architecture."""
    return [sys.executable, "-c", _LAUNCHER, __file__, *args]


@pytest.fixture
def toy_case():
    from stbench.config import Case

    def make(**fields):
        return Case(**{"arch": TOY_ARCH, "frames": 2, "resolution": 16, **fields})

    return make


# Each measured case calls gc.collect() (stbench.measure.memory), which scans every tracked object: the imports'
# ~400k and what earlier test modules left (diffusers, matplotlib, fixtures' models) made one collection cost
# 0.2-0.5 s late in the suite.
def pytest_collection_finish(session):
    collect_and_freeze()  # as the command line freezes its imports (stbench.measure.memory.freeze_imports)


@pytest.fixture(autouse=True, scope="module")
def _freeze_what_earlier_modules_left():
    collect_and_freeze()  # a module's cases' collections scan only what the module made


@pytest.fixture(autouse=True)
def _one_thread():
    """Two shared cores: keep each test to one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

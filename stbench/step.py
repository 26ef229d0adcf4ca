"""One training step of a fresh model on a fixed synthetic batch: the unit that stbench measures."""
from __future__ import annotations

import contextlib
import sys

import torch
from torch.profiler import record_function

from . import regimes
from .config import TORCH_DTYPES, Case


class TrainingStep:
    """Model + optimizer + one fixed batch; calling it runs forward, loss, backward, optimizer step, zero_grad."""

    # Weights stay fp32 unless the case's param_dtype is bf16 (mixed precision through autocast, as real training
    # does; fp16 runs without a GradScaler, whose few elementwise kernels are left out); the batch is made once,
    # so a step measures the model and optimizer, not data generation.

    def __init__(self, case: Case, *, seed: int = 0, lr: float = 1e-4, init=None):
        self.case = case
        self.device = torch.device(case.device)
        # Compile caches are per process: without a reset, earlier cases' shapes count towards dynamo's
        # recompile limit (past it, compiled code such as FlexAttention silently runs eagerly).
        if "torch._dynamo" in sys.modules:  # not imported: nothing was compiled
            torch._dynamo.reset()
        torch.manual_seed(seed)
        self.model = case.build_model(self.device)
        if case.weights is not None:
            from .weights import load_weights  # noqa: local, a checkpoint is read only when one is named

            load_weights(self.model, case)
        if init is not None:  # e.g. `train`'s shared initial weights: on the base model, before any adapter
            init(self.model)
        self.model.set_training_mode(case.mode)
        self.model.train()
        # LoRA, bf16 parameters, checkpointing on one process (the case's regime, stbench.regimes)
        regimes.apply_regimes(self.model, case)
        self.encoders = None
        if case.encoders == "resident":  # held for the whole step, frozen, as an encode-on-the-fly script holds them
            with torch.device(self.device):
                self.encoders = regimes.resident_encoders(self.model)
        self.trainable = self.model.trainable_parameters()
        if not self.trainable:
            raise ValueError(f"{case.arch} has no trainable parameters in mode {case.mode!r}")
        self.optimizer = regimes.make_optimizer(case, self.trainable, lr=lr)
        self.batch = self.model.make_batch(case.batch, case.frames, *case.frame_hw,
                                           device=self.device, dtype=regimes.input_dtype(case), seed=seed)
        self.autocast_dtype = None if case.dtype == "fp32" else TORCH_DTYPES[case.dtype]
        # torch.compile traces the whole forward + loss; AOTAutograd compiles its backward too.
        self.loss_fn = torch.compile(self.model.loss) if case.compile else self.model.loss

    def warmup_steps(self, requested: int) -> int:
        """`requested`, extended where the model's first steps differ from its steady state."""
        return self.model.warmup_steps(requested)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def compute_loss(self, *, eager: bool = False) -> torch.Tensor:
        """Forward + loss on the step's batch (eager skips torch.compile, e.g. for counting hooks)."""
        if self.encoders is not None:  # --encoders resident: encode the batch's video and prompts first
            with record_function("encoders"):
                regimes.encode_on_the_fly(self.encoders, self.model, self.batch)
        with self.autocast():
            return (self.model.loss if eager else self.loss_fn)(self.batch)

    def forward_backward(self, *, eager: bool = False) -> torch.Tensor:
        # named regions for traces (stbench.trace); each costs one profiler range, nothing when not profiling
        with record_function("forward"):
            loss = self.compute_loss(eager=eager)
        with record_function("backward"):
            loss.backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        with record_function("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, *, eager: bool = False) -> torch.Tensor:
        loss = self.forward_backward(eager=eager)
        self.optimizer_step()
        self.synchronize()
        return loss

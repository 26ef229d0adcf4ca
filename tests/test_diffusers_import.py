"""Built-in families import diffusers as it is without the integrations stbench never calls through it
(architectures.diffusers_import); once a user's model is resolved, or where one of them was imported first,
diffusers comes whole; the models compute the same every way, and stbench's own uses of those packages still
import them."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

_CHILD = """
import importlib, json, sys
import torch
torch.set_num_threads(1)
import architectures
from architectures import diffusers_import

if sys.argv[1] == "user":
    architectures.get("examples.my_video_model:build")  # resolving a user's model: diffusers whole from here on
elif sys.argv[1] == "transformers-first":
    import transformers  # a script that loaded a tokenizer first: nothing is hidden (accelerate is its import)
out = {}
for name, frames in (("wan", 5), ("serial-unet", 4)):  # a diffusers transformer and the UNet
    torch.manual_seed(0)
    model = architectures.build(name)
    loss = model.loss(model.make_batch(1, frames, 32, 32))
    loss.backward()
    out[name] = [loss.item(), sum(p.grad.double().sum().item() for p in model.parameters() if p.grad is not None)]
import diffusers.utils
out["imported"] = sorted(n for n in diffusers_import.UNUSED if n in sys.modules)
out["peft_backend"] = diffusers.utils.USE_PEFT_BACKEND
out["later"] = [importlib.import_module(n).__name__ for n in diffusers_import.UNUSED]
print(json.dumps(out))
"""


def test_built_in_models_import_diffusers_without_unused_integrations_and_compute_the_same():
    children = {how: subprocess.Popen([sys.executable, "-c", _CHILD, how], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
                for how in ("built-in", "user", "transformers-first")}
    out = {}
    for how, child in children.items():
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr
        out[how] = json.loads(stdout.strip().splitlines()[-1])
    lean, whole, first = out["built-in"], out["user"], out["transformers-first"]
    assert lean["imported"] == [] and lean["peft_backend"] is False
    assert whole["imported"] == sorted(["peft", "transformers", "bitsandbytes", "accelerate", "scipy"])
    assert whole["peft_backend"] is True
    assert lean["later"] == whole["later"] == ["peft", "transformers", "bitsandbytes", "accelerate", "scipy"]
    assert lean["wan"] == whole["wan"] == first["wan"]  # loss and gradient sums
    assert lean["serial-unet"] == whole["serial-unet"] == first["serial-unet"]
    assert first["peft_backend"] is True and "transformers" in first["imported"]

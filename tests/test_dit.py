"""The video DiT family: registration, shapes, training steps in both modes, groups, presets, CP hooks."""
import pytest
import torch

import architectures
from architectures.dit import ARCHS, DiTConfig, sincos_3d
from stbench.config import Case
from stbench.errors import UserError

DIT_ARCHS = sorted(ARCHS)


def test_every_dit_arch_is_registered_in_the_dit_family():
    for name in DIT_ARCHS:
        arch = architectures.get(name)
        assert arch.family == "dit" and arch.config_cls is DiTConfig
        assert set(arch.presets) == {"tiny", "small", "0.8b", "2.7b"}


@pytest.mark.parametrize("mode", ["full", "temporal"])
@pytest.mark.parametrize("name", DIT_ARCHS)
def test_training_step_and_backward(name, mode):
    torch.manual_seed(0)
    overrides = {"dense_steps": 0, "sparsity": 0.5, "block_size": 8} if name == "dit-dsv" else {}
    model = architectures.build(name, "tiny", **overrides).set_training_mode(mode)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    batch = model.make_batch(2, 4, 32, 32)  # 4 frames x 2 x 2 tokens
    for _ in range(2):  # the first step leaves zero-initialised outputs behind, the second back-propagates through
        loss = model.loss(batch)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    pred = model(batch.latents, batch.timesteps, batch.text)
    assert pred.shape == batch.latents.shape
    for pname, p in model.named_parameters():
        frozen = mode == "temporal" and model.group_of(pname) == "spatial"
        assert p.requires_grad != frozen, pname
    if mode == "temporal":
        assert model.parameter_groups().get("temporal") or model.parameter_groups().get("estimator")


def test_parameter_groups():
    groups = {n: architectures.build(n, "tiny").parameter_groups() for n in DIT_ARCHS}
    assert any(".temporal_attn." in p for p in groups["dit-serial-st"]["temporal"])
    assert any(".attn.temporal." in p for p in groups["dit-parallel-st"]["temporal"])
    assert not any(".attn.spatial." in p for p in groups["dit-parallel-st"]["temporal"])
    assert sorted(groups["dit-dsv"]["estimator"]) == sorted(
        f"blocks.{i}.attn.{w}_estimator" for i in range(2) for w in "qk")
    # full / window / dsv: the frame-mixing self-attention projections are the temporal layers
    for name in ("dit-full", "dit-window", "dit-dsv"):
        assert sorted(groups[name]["temporal"]) == sorted(
            f"blocks.{i}.attn.{p}.{t}" for i in range(2) for p in ("qkv", "out") for t in ("weight", "bias"))
    assert "patch_embed.weight" in groups["dit-full"]["spatial"]


def test_resolution_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="height must be a multiple of 16"):
        architectures.get("dit-full").check_shape(DiTConfig(), 8, 72, 64)
    with pytest.raises(UserError, match="multiple of 16"):
        Case(arch="dit-dsv", resolution=72)
    Case(arch="dit-dsv", resolution=80)


def test_set_overrides_are_typed_and_validated():
    case = Case(arch="dit-dsv", overrides=(("dense_steps", "0"), ("sparsity", "0.9"), ("window_size", "2,4,4")))
    config = case.model_config()
    assert config.sparsity == 0.9 and config.dense_steps == 0 and config.window_size == (2, 4, 4)
    assert Case(arch="dit-dsv", overrides=(("sparsity", "none"),)).model_config().sparsity is None
    with pytest.raises(UserError, match="sparsity"):
        Case(arch="dit-dsv", overrides=(("sparsity", "1.5"),))
    # an explicit FlexAttention backend must get blocks its kernel can tile exactly, not a silent gather
    with pytest.raises(UserError, match="block_size: 48 cannot be a FlexAttention tile"):
        Case(arch="dit-dsv", overrides=(("sparse_backend", "flex"), ("block_size", "48")))


def test_patchify_roundtrip_and_position_embedding():
    model = architectures.build("dit-full", "tiny")
    x = torch.randn(2, 4, 3, 8, 6)
    tokens, grid = model.patchify(x)
    assert grid == (3, 4, 3) and tokens.shape == (2, 36, 16)
    assert torch.equal(model.unpatchify(tokens, grid), x)
    pos = sincos_3d(64, grid)
    assert pos.shape == (36, 64) and len({tuple(r.tolist()) for r in pos}) == 36  # every token distinct
    # channels 0:20 encode the frame, 20:40 the row, 40:60 the column (60:64 zero)
    torch.testing.assert_close(pos[:12, :20], pos[:1, :20].expand(12, 20))
    assert not torch.allclose(pos[0, :20], pos[12, :20])
    torch.testing.assert_close(pos[:12, 20:60], pos[12:24, 20:60])
    assert pos[:, 60:].eq(0).all()


def test_presets_are_sized_like_dsv_models():
    counts = {p: sum(t.numel() for t in architectures.build("dit-full", p, device="meta").parameters())
              for p in ("0.8b", "2.7b")}
    assert 0.75e9 < counts["0.8b"] < 0.9e9
    assert 2.6e9 < counts["2.7b"] < 3.1e9
    big = architectures.make_config("dit-dsv", "0.8b")
    assert (big.depth, big.heads, big.head_dim, big.hidden_size) == (28, 12, 96, 1152)


class FakeContextParallel:
    """Single-process stand-in for the CP helper: identity sharding, local core; records calls."""

    def __init__(self):
        self.calls = []

    def shard_tokens(self, x):
        self.calls.append(("shard", x.shape))
        return x

    def gather_tokens(self, x):
        self.calls.append(("gather", x.shape))
        return x

    def attention(self, q, k, v, module):
        self.calls.append(("attention", q.shape))
        return module.core(q, k, v)


@pytest.mark.parametrize("name", ["dit-full", "dit-dsv", "dit-serial-st"])
def test_context_parallel_hooks(name):
    torch.manual_seed(0)
    model = architectures.build(name, "tiny")
    for p in model.parameters():  # leave no zero-initialised output: every path matters
        torch.nn.init.normal_(p, std=0.05)
    batch = model.make_batch(1, 2, 32, 32)
    with torch.no_grad():
        plain = model(batch.latents, batch.timesteps, batch.text)
        cp = model.context_parallel = FakeContextParallel()
        hooked = model(batch.latents, batch.timesteps, batch.text)
    torch.testing.assert_close(hooked, plain)
    kinds = [c[0] for c in cp.calls]
    assert kinds[0] == "shard" and kinds[-1] == "gather"
    per_block = 2 if name == "dit-serial-st" else 1
    assert kinds.count("attention") == 2 * per_block and cp.calls[1][1] == (1, 2, 8, 32)  # (B, H, N, D)

"""Where the trained tiny DiT's attention is (not) block-sparse: per held-out clip (one noise level each), the
block sparsity (key blocks of 64 not needed for 90% of a query's attention mass, DSV's profile) of queries on
the black background against queries covering a shape, per layer, at 8 frames x 128 px = 512 tokens.

    OMP_NUM_THREADS=2 python scripts/dsv_sparsity_by_token.py > reports/dsv/sparsity-by-token.txt
"""
import torch

import architectures
from architectures.attention import full
from architectures.attention.dsv import block_sparsity
from stbench.config import Case
from stbench.data import BACKGROUND, DatasetConfig, MovingShapes
from stbench.weights import load_weights

FRAMES, RESOLUTION, TOKEN_PIXELS, BLOCK, COVERAGE = 8, 128, 16, 64, 0.9  # a token: one frame's 16x16 pixels


def main() -> None:
    case = Case(arch="dit-full", preset="tiny", frames=FRAMES, resolution=RESOLUTION, device="cpu", weights="trained")
    model = architectures.build("dit-full", "tiny").eval()
    load_weights(model, case)
    data = MovingShapes(DatasetConfig(seed=0, frames=FRAMES, resolution=RESOLUTION, heldout=16), model)
    captured = []
    dense = full.FullAttention.core

    def core(self, q, k, v, head_offset=0):  # (B, H, N, D): keep q, k of every layer
        captured.append((q, k))
        return dense(self, q, k, v, head_offset)

    full.FullAttention.core = core
    side = RESOLUTION // TOKEN_PIXELS
    print(f"trained dit-full tiny, held-out clips, {FRAMES} frames x {RESOLUTION} px = {FRAMES * side * side} tokens; "
          f"sparsity = 1 - (blocks of {BLOCK} keys holding {COVERAGE:.0%} of the mass) / blocks, mean over heads")
    for i, batch in enumerate(data.heldout_batches(1)):
        clip = data.clip("heldout", i)  # (3, F, H, W)
        on_shape = (clip != BACKGROUND).any(0).unflatten(1, (side, TOKEN_PIXELS)).unflatten(3, (side, TOKEN_PIXELS))
        on_shape = on_shape.any(4).any(2).reshape(-1)  # (N,) in (frame, row, col) order, as the DiT's tokens
        captured.clear()
        with torch.no_grad():
            model.loss(batch)
        cells = []
        for layer, (q, k) in enumerate(captured):
            probs = torch.softmax((q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5, -1)  # (1, H, N, N)
            sparsity = block_sparsity(probs, BLOCK, COVERAGE)  # (1, H, N)
            cells.append(f"layer {layer}: background {float(sparsity[..., ~on_shape].mean()):.3f}, "
                         f"shape {float(sparsity[..., on_shape].mean()):.3f}")
        print(f"t={int(batch.timesteps[0]):4d} shape tokens {int(on_shape.sum()):3d} | " + " | ".join(cells))


if __name__ == "__main__":
    main()

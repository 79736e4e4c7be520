"""Tiled MLP (DeepSpeed's TiledMLP): the MLP of every block runs over the sequence in tiles.

For long sequences the MLP's intermediate activations ([tokens, intermediate_size], several times
the hidden size, and held for backward) dominate activation memory. With `train.tiled_mlp: N` each
block's MLP runs on N tiles of the sequence one after another, under no_grad, and recomputes each
tile in backward: peak memory holds one tile's intermediates instead of the whole sequence's, for
one extra MLP forward per step. The maths is unchanged (per-token computation); under ZeRO the
weights' gradients are handed to DeepSpeed once, after the last tile.
"""

from __future__ import annotations

import functools

import torch


def _tiled_forward(mlp: torch.nn.Module, plain_forward, shards: int, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    if not torch.is_grad_enabled() or not mlp.training:
        return plain_forward(mlp, x)  # evaluation and generation: no activations kept anyway
    params = [p for p in mlp.parameters() if p.requires_grad]
    return TiledMLP.apply(plain_forward, mlp, x, min(shards, x.shape[-2]), params)


def install_tiled_mlp(model: torch.nn.Module, shards: int) -> int:
    """Give every decoder block's `mlp` a tiled forward; returns how many blocks got one."""
    count = 0
    for name, module in model.named_modules():
        if name.endswith(".mlp") and ".layers." in name:
            plain = type(module).forward
            module.forward = functools.partial(_tiled_forward, module, plain, shards)
            count += 1
    if not count:
        raise ValueError(f"train.tiled_mlp: no decoder block `mlp` found in {type(model).__name__}")
    return count

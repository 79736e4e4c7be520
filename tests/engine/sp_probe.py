"""One optimizer step's forward/backward with sequence parallelism, as the trainer runs it, saving the
full gradients on rank 0.

    deepspeed --num_gpus W tests/engine/sp_probe.py --out grads.pt --sp 2 --micro 2 [--packed] [--zero 2]

The global batch is `samples()` laid into rows by the real collate (one sample per row, or two per
row with --packed); each data-parallel group takes its block of rows, each rank of a group its cut
of every row (MicroBatch.sequence_shard), and attention runs through engine/sequence_parallel.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
# Run as a script, this folder comes first on sys.path, and its kernels/ would shadow the installed
# `kernels` package that transformers imports: the repository root takes its place.
sys.path[:] = [str(REPO_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from tests.engine.grad_probe import (LENGTH, RESPONSE_TOKENS, ROWS, VOCAB, full_gradients,  # noqa: E402
                                     exit_after_result, save_result, tiny_model)


def samples(packed: bool) -> list[list]:
    """Rows of LoadedSample: the same tokens either way; packed rows hold two samples of LENGTH / 2."""
    from data_pipeline.schedule.collate import LoadedSample
    from data_pipeline.schedule.labels import IGNORE_INDEX

    g = np.random.default_rng(1)
    rows = []
    for r, n in enumerate(RESPONSE_TOKENS):
        ids = g.integers(3, VOCAB, LENGTH)
        labels = np.full(LENGTH, IGNORE_INDEX)
        if n:
            labels[LENGTH - n:] = ids[LENGTH - n:]
        if packed:
            half = LENGTH // 2
            rows.append([LoadedSample(0, 2 * r, ids[:half], labels[:half]),
                         LoadedSample(0, 2 * r + 1, ids[half:], labels[half:])])
        else:
            rows.append([LoadedSample(0, r, ids, labels)])
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--micro", type=int, required=True)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--packed", action="store_true")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()

    import deepspeed
    import torch.distributed as dist
    from data_pipeline.schedule.collate import collate_rows
    from data_pipeline.schedule.labels import count_targets
    from engine.loss import CausalLMWithMaskedLoss, scaled_for_deepspeed
    from engine.sequence_parallel import SequenceParallelLayout, UlyssesAttention

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = SequenceParallelLayout.of(rank, world, args.sp)
    lm = tiny_model()
    lm.config._attn_implementation = "sdpa"  # the real runs' default; eager would build dense masks
    model = CausalLMWithMaskedLoss(lm, backend="torch")
    ulysses = UlyssesAttention(model.lm, args.sp, args.micro) if layout.enabled else None
    rows_per_group = ROWS // layout.groups
    accum = rows_per_group // args.micro
    ds_config = {  # DeepSpeed counts every rank as data-parallel (engine/sequence_parallel.py)
        "train_batch_size": ROWS * layout.size, "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": accum, "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    mine = samples(args.packed)[layout.group * rows_per_group:(layout.group + 1) * rows_per_group]
    mask_format = "none" if layout.enabled else "bool"
    micro_batches = [collate_rows(mine[j * args.micro:(j + 1) * args.micro], LENGTH, 0, mask_format)
                     for j in range(accum)]
    count = torch.tensor([sum(count_targets(mb.labels) for mb in micro_batches) if layout.rank == 0 else 0])
    dist.all_reduce(count)
    total_loss = torch.zeros(1, dtype=torch.float64)
    grads = {}
    for j, mb in enumerate(micro_batches):
        if layout.enabled:
            mb = mb.sequence_shard(layout.rank, layout.size)
        loss_sums, _ = engine(**mb.model_inputs())
        total_loss += loss_sums.detach().double().sum()
        engine.backward(scaled_for_deepspeed(loss_sums.sum(), int(count), world, accum))
        if j == accum - 1:
            grads = full_gradients(engine)
        engine.step()
    save_result(args.out, grads, total_loss, int(count))
    if ulysses is not None:
        ulysses.restore()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    exit_after_result()

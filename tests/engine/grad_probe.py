"""Run one optimizer step's forward/backward through DeepSpeed exactly as the trainer does, and
save the full (unpartitioned) gradients of every parameter on rank 0.

    deepspeed --num_gpus W tests/engine/grad_probe.py --out grads.pt --zero 2 --micro 2 --accum 2

The global batch is fixed by `global_batch()`; each rank takes its contiguous block of rows and
splits it into micro-batches, like data_pipeline/schedule/stream.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
# Run as a script, this folder comes first on sys.path, and its kernels/ would shadow the installed
# `kernels` package that transformers imports: the repository root takes its place.
sys.path[:] = [str(REPO_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROWS, LENGTH, VOCAB = 8, 24, 300
# Response tokens per row: very different per micro-batch, so a per-micro-batch mean would be wrong.
RESPONSE_TOKENS = [1, 20, 3, 0, 15, 2, 9, 22]


def tiny_model(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg)


def with_lora(model, r: int, save_head: bool = False):
    """The model with LoRA adapters (engine/lora.py) whose B matrices are made non-zero, the same
    way in every process, so that the gradients of A and B both carry information."""
    from engine.config import LoraConfig
    from engine.lora import apply_lora

    lora = LoraConfig(r=r, alpha=2.0 * r, modules_to_save=["lm_head"] if save_head else [])
    model = apply_lora(model, lora, base_path="", seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return model


def global_batch(masked_everything: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (ROWS, LENGTH), generator=g)
    labels = torch.full_like(input_ids, -100)
    if not masked_everything:
        for r, n in enumerate(RESPONSE_TOKENS):
            if n:
                labels[r, LENGTH - n:] = input_ids[r, LENGTH - n:]
    return {"input_ids": input_ids, "labels": labels}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--micro", type=int, required=True)
    p.add_argument("--accum", type=int, required=True)
    p.add_argument("--hf-loss", action="store_true", help="full logits + F.cross_entropy instead of the fused loss")
    p.add_argument("--untied", action="store_true")
    p.add_argument("--strategy", default="row_chunks", help="fused loss algorithm (row_chunks or vocab_blocks)")
    p.add_argument("--masked-everything", action="store_true")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0 = full-parameter)")
    p.add_argument("--lora-save-head", action="store_true", help="with --lora: train the lm_head whole too")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()

    import deepspeed
    import torch.distributed as dist

    from data_pipeline.schedule.labels import count_targets
    from engine.loss import CausalLMWithMaskedLoss, scaled_for_deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if ROWS != world * args.micro * args.accum:
        raise SystemExit(f"{ROWS} rows != world {world} x micro {args.micro} x accum {args.accum}")
    model = CausalLMWithMaskedLoss(tiny_model(tie=not args.untied), fused=not args.hf_loss, backend="torch",
                                   strategy=args.strategy)
    if args.lora:  # as the trainer does it: after the fused head is in place
        model.lm = with_lora(model.lm, args.lora, args.lora_save_head)
    ds_config = {
        "train_batch_size": ROWS, "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": args.accum, "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero},
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)

    batch = global_batch(args.masked_everything)
    rows_per_rank = ROWS // world
    mine = {k: v[rank * rows_per_rank:(rank + 1) * rows_per_rank] for k, v in batch.items()}
    micro_batches = [{k: v[j * args.micro:(j + 1) * args.micro] for k, v in mine.items()} for j in range(args.accum)]
    count = torch.tensor([sum(count_targets(mb["labels"]) for mb in micro_batches)])
    dist.all_reduce(count)
    total_loss = torch.zeros(1, dtype=torch.float64)
    grads = {}
    for j, mb in enumerate(micro_batches):
        loss_sums, _ = engine(**mb)
        total_loss += loss_sums.detach().double().sum()
        engine.backward(scaled_for_deepspeed(loss_sums.sum(), int(count), world, args.accum))
        if j == args.accum - 1:  # at the boundary, after the reduction, before the optimizer step
            grads = full_gradients(engine)
        engine.step()
    save_result(args.out, grads, total_loss, int(count))
    dist.destroy_process_group()


def full_gradients(engine) -> dict:
    """name -> the full (gathered) float64 gradient of every trainable parameter, on every rank."""
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:  # a LoRA base: frozen, no gradient to compare
            continue
        grad = safe_get_full_grad(param)
        grads[name] = None if grad is None else grad.detach().double().cpu().clone()
    return grads


def save_result(out: str, grads: dict, total_loss: torch.Tensor, count: int) -> None:
    """Sum the loss over ranks; rank 0 writes what the tests compare."""
    import torch.distributed as dist

    dist.all_reduce(total_loss)
    if dist.get_rank() == 0:
        torch.save({"grads": grads, "loss_sum": float(total_loss), "count": count}, out)
    dist.barrier()


def exit_after_result() -> None:
    """End the process once the result is written and every rank has passed the barrier.

    At interpreter shutdown DeepSpeed still holds its gloo process groups, and their worker threads
    are torn down during finalisation; about one launch in sixty, under load, a rank then aborts
    ("terminate called without an active exception") after the result is safely on disk, and the
    launcher reports the whole run failed. This probe measures gradients, not shutdown: leave
    without the finalisation."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    exit_after_result()

"""Export the trained model to a plain HF directory (safetensors + config + tokenizer).

In-process, every parameter is gathered one at a time (a no-op below ZeRO-3) and copied to CPU in
the export dtype on rank 0, so the full model exists once, in the export dtype, never twice in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from engine.model import DTYPES


def gather_state_dict(model, dtype: torch.dtype) -> dict:
    """Full parameters and persistent buffers on rank 0 (empty dict elsewhere)."""
    import deepspeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    state = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.data.detach().to(dtype=dtype, device="cpu").clone()
    if rank == 0:
        non_persistent = {
            f"{mod_name}.{b}" if mod_name else b
            for mod_name, mod in model.named_modules()
            for b in getattr(mod, "_non_persistent_buffers_set", ())
        }
        for name, buf in model.named_buffers():
            if name not in non_persistent:
                state[name] = buf.detach().cpu().clone()
    return state


def export_hf(model, tokenizer, out_dir: str | Path, dtype_name: str) -> Path | None:
    """Write model + tokenizer to out_dir (rank 0); every rank must call this."""
    out_dir = Path(out_dir)
    dtype = DTYPES[dtype_name]
    state = gather_state_dict(model, dtype)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.config.use_cache = True  # exported models generate with a KV cache
        model.config.dtype = dtype
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        model.config.use_cache = False
        tokenizer.save_pretrained(str(out_dir))
    if dist.is_initialized():
        dist.barrier()
    return out_dir if rank == 0 else None

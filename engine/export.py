"""Export the trained model to a plain HF directory (safetensors + config + tokenizer).

In-process, every parameter is gathered one at a time (a no-op below ZeRO-3) and copied to CPU in
the export dtype on rank 0, so the full model exists once, in the export dtype, never twice in fp32.

Offline, from a checkpoint of any ZeRO stage (no GPU, no process group):

    python -m engine.export --checkpoint <run_dir>/checkpoints/step_00000100 [--out DIR] [--dtype bf16]

The checkpoint holds the model config, generation config and tokenizer (engine/checkpointing/checkpoint.py), so
the export needs nothing else. A LoRA run's checkpoint also holds its adapter_config.json: its
export is the base with the adapter merged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from engine.checkpointing import checkpoint
from engine.checkpointing.reshard import has_zero_partitions
from engine.lora import export_adapter, export_merged, is_adapter_dir, merged_model
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


def export_hf(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | str) -> Path | None:
    """Write model + tokenizer to out_dir (rank 0); every rank must call this."""
    out_dir = Path(out_dir)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
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


def export_run(lm, tokenizer, run_dir: Path, dtype: torch.dtype, *, lora: bool, merged: bool, say) -> Path | None:
    """The end of a run: <run_dir>/export holds the model, or with LoRA the adapter in PEFT format,
    and on request <run_dir>/export_merged the base with the adapter merged (every rank calls)."""
    out = Path(run_dir) / "export"
    if not lora:
        written = export_hf(lm, tokenizer, out, dtype)
        if written is not None:
            say(f"exported the model to {written}")
        return written
    written = export_adapter(lm, tokenizer, out, dtype)
    if written is not None:
        say(f"exported the adapter to {written} (base: {lm.peft_config['default'].base_model_name_or_path})")
    if merged:
        merged_dir = export_merged(lm, tokenizer, Path(run_dir) / "export_merged", dtype)
        if merged_dir is not None:
            say(f"exported the merged model to {merged_dir}")
    return written


# ----------------------------------------------------------------------------------------------
# offline: from a DeepSpeed checkpoint on disk, any ZeRO stage, no GPU and no process group

LM_PREFIX = "lm."  # the trained module wraps the HF model as `.lm` (engine/loss.py)


def _lazy_checkpoint_tensors(ckpt: Path) -> dict:
    """name -> tensor-like with .contiguous(), fp32, unwrapped from the training module's prefix.

    ZeRO-1/2/3: DeepSpeed's zero_to_fp32 merges the fp32 master partitions of every rank (lazily
    under ZeRO-3: one parameter at a time). ZeRO-0: the model-state file holds the full module.
    """
    if has_zero_partitions(ckpt):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
    else:
        files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{ckpt}: no DeepSpeed model-state file (mp_rank_*_model_states.pt)")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {name[len(LM_PREFIX):] if name.startswith(LM_PREFIX) else name: t for name, t in state.items()}


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, dtype_name: str = "fp32") -> Path:
    """Write a HF model directory from a saved checkpoint (engine/checkpointing/checkpoint.py layout).

    Tensors are merged and cast to the export dtype one at a time, so peak memory is the exported
    model plus one fp32 parameter (under ZeRO-1/2 DeepSpeed merges each fp32 group at once).
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if dtype_name not in DTYPES:
        raise ValueError(f"--dtype: {dtype_name!r} is not one of {', '.join(DTYPES)}")
    if not checkpoint.is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {checkpoint.COMPLETE} marker)")
    hf_dir = ckpt / checkpoint.HF_DIR
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}/config.json: missing; this checkpoint predates saved model metadata")
    dtype = DTYPES[dtype_name]
    config = AutoConfig.from_pretrained(str(hf_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    if is_adapter_dir(hf_dir):
        return _export_lora_checkpoint(ckpt, hf_dir, config, tokenizer, out_dir, dtype)
    state = {}
    for name, lazy in _lazy_checkpoint_tensors(ckpt).items():
        tensor = lazy.contiguous()
        # A copy, also when the dtype is unchanged: ZeRO-1/2 tensors are views of one flat buffer,
        # which safetensors would refuse (and would otherwise be kept alive whole).
        state[name] = tensor.to(dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
        del tensor
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # HF re-ties it to the input embedding on load
    out_dir.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state, str(out_dir), metadata={"format": "pt"})
    config.use_cache = True
    config.dtype = dtype
    config.save_pretrained(str(out_dir))
    generation = (GenerationConfig.from_pretrained(str(hf_dir))
                  if (hf_dir / "generation_config.json").is_file() else GenerationConfig())
    generation.eos_token_id, generation.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    generation.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def _export_lora_checkpoint(ckpt: Path, hf_dir: Path, config, tokenizer, out_dir: Path, dtype: torch.dtype) -> Path:
    """A LoRA run's checkpoint: its base with the adapter merged (PEFT's merge_and_unload), as a HF model."""
    from peft import PeftConfig
    from transformers import GenerationConfig

    state = {name: lazy.contiguous().to(torch.float32, copy=True) for name, lazy in _lazy_checkpoint_tensors(ckpt).items()}
    merged = merged_model(config, PeftConfig.from_pretrained(str(hf_dir)), state).to(dtype)
    del state
    merged.config.use_cache = True
    merged.config.dtype = dtype
    if (hf_dir / "generation_config.json").is_file():
        merged.generation_config = GenerationConfig.from_pretrained(str(hf_dir))
    merged.generation_config.eos_token_id = tokenizer.eos_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Export a saved checkpoint to a HF model directory.")
    p.add_argument("--checkpoint", required=True, help="<run_dir>/checkpoints/step_XXXXXXXX")
    p.add_argument("--out", default=None, help="output directory (default: <checkpoint>/../../export_<tag>)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the exported weights")
    args = p.parse_args(argv)
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else ckpt.parent.parent / f"export_{ckpt.name}"
    try:
        written = export_checkpoint(ckpt, out, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"export error: {e}")
        return 2
    print(f"exported {ckpt} to {written}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

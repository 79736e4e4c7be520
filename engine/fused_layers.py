"""Fused layers for the model body: RMSNorm, the SwiGLU gate, rotary embedding and per-sample
attention, one kernel each.

`model.fused_layers` (auto | required | disabled). With auto, a float32 run on CPU uses the C++ kernels of
engine/kernels/cpu (built once per machine on first use); elsewhere the model is left as it is
(no fused body kernels for CUDA here yet: attention and the loss already have their own).
`required` makes a missing kernel a configuration error; `disabled` never touches the model.

What is fused, for the Llama-family modelling files (Llama, Mistral, Qwen2, Qwen3):
  * every `*RMSNorm` module of the model's modelling file (the Llama formula, w * x * rstd):
    its forward is replaced on the instance;
  * every `*MLP` with gate/up/down projections and a SiLU: its forward becomes
    down(fused silu(gate(x)) * up(x)) on the instance (PEFT adapters on the projections still apply);
  * every `nn.Linear` of the decoder (the attention and MLP projections; not the lm_head,
    which the fused loss computes): its forward and both backward products run on oneDNN's fp32
    matmul (engine/kernels/cpu/gemm.cpp; benchmarks/cpu_gemm_bench.py compares it with the BLAS),
    where torch's oneDNN entry point serves float32 (x86 CPUs with AVX-512; the report says
    why not elsewhere, and the projections then stay on the default BLAS);
  * every `*Attention` module of the modelling file is marked so that padding-free micro-batches
    (engine/segment_attention.py) run causal attention for all their samples in one kernel
    (engine/kernels/cpu/segment_causal.py) instead of one SDPA per sample;
  * the modelling file's `apply_rotary_pos_emb`: replaced, process-wide, by a dispatcher that runs
    the kernel for the inputs it takes and the original function for any other (as Liger-Kernel
    patches it). The other models of the process compute what they computed before.
Parameters, module names and state_dict keys do not change: checkpoints and the export are as
before. Each fused forward falls back to the module's own for inputs the kernel does not take
(another dtype or device), so evaluation and generation work unchanged.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from engine.config import ConfigError
from engine.kernels.cpu import linear, rms_norm, rope, silu_mul
from engine.kernels.cpu.extension import load_body_ops, unavailable_reason
from engine.segment_attention import FUSED_CPU_KERNEL

MODES = ("auto", "required", "disabled")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SILU_CLASSES = ("SiLU", "SiLUActivation")


class FusedLayersError(ConfigError):
    """model.fused_layers is `required` but the kernels cannot be used for this run."""


@dataclass(frozen=True)
class FusedLayers:
    """What install_fused_layers did: counts of fused modules, or why nothing was fused."""

    rms_norms: int = 0
    mlps: int = 0
    linears: int = 0
    attentions: int = 0
    rotary: bool = False
    reason: Optional[str] = None
    projections_reason: Optional[str] = None
    """Why the projections stay on the default BLAS although the rest is fused, or None."""

    def describe(self) -> str:
        if self.reason:
            return f"fused layers: none ({self.reason})"
        return (f"fused layers: {self.rms_norms} RMSNorm, {self.mlps} SwiGLU MLP"
                + (", rotary embedding" if self.rotary else "")
                + (f", {self.attentions} per-sample causal attention" if self.attentions else "")
                + (f", {self.linears} projections on oneDNN" if self.linears else "") + " (CPU kernels)"
                + (f"; projections on the default BLAS: {self.projections_reason}" if self.projections_reason else ""))


def _fused_rms_norm_forward(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    ops = load_body_ops()
    if ops is None or not rms_norm.supported(hidden, module.weight):
        return type(module).forward(module, hidden)
    return rms_norm.fused_rms_norm(hidden, module.weight, module.variance_epsilon, ops)


def _fused_mlp_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    ops = load_body_ops()
    gate, up = module.gate_proj(x), module.up_proj(x)
    if ops is None or not silu_mul.supported(gate, up):
        return module.down_proj(module.act_fn(gate) * up)
    return module.down_proj(silu_mul.fused_silu_mul(gate, up, ops))


def _fused_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    ops = load_body_ops()
    if ops is None or not linear.supported(x, module.weight, module.bias):
        return type(module).forward(module, x)
    return linear.fused_linear(x, module.weight, module.bias, ops)


def _rotary_dispatcher(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", 1)
        ops = load_body_ops()
        if args or set(kwargs) - {"unsqueeze_dim"} or ops is None or not rope.supported(q, k, cos, sin, unsqueeze_dim):
            return original(q, k, cos, sin, *args, **kwargs)
        return rope.fused_rope(q, k, cos, sin, ops, unsqueeze_dim)

    apply_rotary_pos_emb.fused_original = original
    return apply_rotary_pos_emb


def _is_fusable_mlp(module: torch.nn.Module) -> bool:
    return (all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)).__name__ in SILU_CLASSES)


def install_fused_layers(model: torch.nn.Module, mode: str, *, on_cuda: bool, dtype: str,
                         say: Optional[Callable[[str], None]] = None) -> FusedLayers:
    """Put the fused kernels into `model` (a Hugging Face causal LM) as the module docstring says."""
    if mode not in MODES:
        raise FusedLayersError(f"model.fused_layers: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "disabled":
        return FusedLayers(reason="model.fused_layers is disabled")
    model_type = getattr(model.config, "model_type", "")
    problem = None
    if on_cuda:
        problem = "no fused body kernels for CUDA here; attention and the loss have their own"
    elif dtype != "fp32":
        problem = f"the CPU kernels are float32 and model.dtype is {dtype}"
    elif model_type not in MODEL_TYPES:
        problem = f"model type {model_type!r} is not one of {', '.join(MODEL_TYPES)}"
    elif load_body_ops(say) is None:
        problem = f"the CPU kernels are unavailable: {unavailable_reason()}"
    if problem:
        if mode == "required":
            raise FusedLayersError(f"model.fused_layers is required, but {problem}")
        return FusedLayers(reason=problem)
    modelling = sys.modules[type(model.get_decoder() if hasattr(model, "get_decoder") else model).__module__]
    norms = mlps = attentions = 0
    for module in model.modules():
        if type(module).__module__ != modelling.__name__:
            continue
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_rms_norm_forward, module)
            norms += 1
        elif name.endswith("MLP") and _is_fusable_mlp(module):
            module.forward = types.MethodType(_fused_mlp_forward, module)
            mlps += 1
        elif name.endswith("Attention"):
            setattr(module, FUSED_CPU_KERNEL, True)
            attentions += 1
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    linears = 0
    for module in body.modules() if linear.available() else ():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_fused_linear_forward, module)
            linears += 1
    current = getattr(modelling, "apply_rotary_pos_emb", None)
    rotary = current is not None
    if rotary and not hasattr(current, "fused_original"):
        modelling.apply_rotary_pos_emb = _rotary_dispatcher(current)
    return FusedLayers(rms_norms=norms, mlps=mlps, linears=linears, attentions=attentions, rotary=rotary,
                       projections_reason=linear.unavailable_reason())

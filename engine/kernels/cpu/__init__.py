"""Fused CPU kernels for the decoder body (RMSNorm, the SwiGLU gate, rotary embedding), float32.

body_ops.cpp holds the C++ kernels, built once per machine on first use (extension.py); rms_norm.py,
silu_mul.py and rope.py each hold one kernel's autograd Function, its checks and its float64
reference. engine/fused_layers.py puts them into a Hugging Face model.
"""

"""Fused CPU kernels for the decoder body (RMSNorm, the SwiGLU gate, rotary embedding, per-sample
attention) and the loss's per-row cross-entropy step, float32.

The C++ kernels (body_ops.cpp, gemm.cpp, attention.cpp, cross_entropy.cpp) are built once per
machine on first use (extension.py); rms_norm.py, silu_mul.py, rope.py, segment_causal.py,
linear.py and vocab_major_ce.py each hold one kernel's entry point, its checks and (autograd
kernels) its float64 reference. engine/fused_layers.py puts them into a Hugging Face model.
"""

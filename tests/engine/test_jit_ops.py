"""Which DeepSpeed C++ ops a launch will compile (and so announce): those not cached or prebuilt."""

from __future__ import annotations

from pathlib import Path

from engine.jit_ops import CPU_ADAM_OP, FUSED_ADAM_OP, SHM_COMM_OP, build_notices, extensions_root, optimizer_ops, \
    uncached_ops


def test_an_op_is_announced_until_its_extension_is_cached(tmp_path):
    ops = [SHM_COMM_OP, CPU_ADAM_OP]
    assert uncached_ops(ops, tmp_path, prebuilt={}) == ops
    (tmp_path / CPU_ADAM_OP).mkdir()
    (tmp_path / CPU_ADAM_OP / f"{CPU_ADAM_OP}.so").write_bytes(b"")
    assert uncached_ops(ops, tmp_path, prebuilt={}) == [SHM_COMM_OP]
    assert uncached_ops(ops, tmp_path, prebuilt={SHM_COMM_OP: True}) == []
    (notice,) = build_notices(ops, tmp_path, prebuilt={})
    assert notice == (f"building DeepSpeed's {SHM_COMM_OP} C++ op (first run only, ~1-2 min; cached in "
                      f"{tmp_path / SHM_COMM_OP})")


def test_extensions_dir_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == Path(tmp_path)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert extensions_root().name.startswith("py3")


def test_optimizer_op_follows_the_deepspeed_config():
    adam = {"type": "AdamW", "params": {"lr": 1e-3}}
    assert optimizer_ops({"optimizer": adam}) == [FUSED_ADAM_OP]
    offload = {"offload_optimizer": {"device": "cpu"}}
    assert optimizer_ops({"optimizer": adam, "zero_optimization": offload}) == [CPU_ADAM_OP]
    torch_adam = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}
    assert optimizer_ops({"optimizer": torch_adam, "zero_optimization": offload}) == []

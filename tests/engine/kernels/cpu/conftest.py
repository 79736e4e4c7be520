"""The built C++ ops for the CPU kernel tests: a build failure fails them (it must not hide as a
skip); ZHILING_CPU_OPS=0 skips them on purpose."""

from __future__ import annotations

import os

import pytest

from engine.kernels.cpu.extension import DISABLE_ENV, load_body_ops, unavailable_reason


@pytest.fixture(scope="session")
def ops():
    if os.environ.get(DISABLE_ENV, "1").strip() == "0":
        pytest.skip(f"{DISABLE_ENV}=0")
    built = load_body_ops()
    if built is None:
        pytest.fail(f"the fused CPU kernels did not build: {unavailable_reason()}")
    return built

"""The C++ kernels compile at every vector level the loader may pick, not only this machine's.

The library is built on first use for the CPU's capability (AVX-512, AVX2 or ATen's portable
default), and ATen's vector headers differ between those levels: a source that builds on an AVX2
machine can fail on an AVX-512 one. The real build (the `ops` fixture) covers this machine's level;
here the other levels are compiled syntax-only with the flags the loader would use there.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.utils.cpp_extension import include_paths

from engine.kernels.cpu import extension

LEVELS = [*extension.CAPABILITY_FLAGS, "DEFAULT"]


def compile_syntax_only(source, level: str) -> subprocess.CompletedProcess:
    includes = [f"-isystem{path}" for path in [*include_paths(), sysconfig.get_paths()["include"]]]
    command = ["c++", "-fsyntax-only", "-std=c++20", "-fPIC", f"-DTORCH_EXTENSION_NAME={extension.library_name(level)}",
               "-DTORCH_API_INCLUDE_EXTENSION_H", *includes, *extension.build_flags(level), str(source)]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.parametrize("level", LEVELS)
def test_sources_compile_at_every_capability_level(level):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    if level == extension.capability():
        pytest.skip(f"{level} is this machine's level: the real build of the kernel tests covers it")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda source: compile_syntax_only(source, level), extension.SOURCES))
    failures = {source.name: extension.build_failure_summary(result.stderr)
                for source, result in zip(extension.SOURCES, results) if result.returncode != 0}
    assert failures == {}, failures


def test_a_failed_build_is_reported_by_its_compiler_error():
    text = ("Error building extension 'zhiling_cpu_body_ops_avx512': [1/3] c++ -MMD -MF attention.o.d -isystem x\n"
            "FAILED: attention.o\n"
            "attention.cpp:96:42: error: no matching function for call to 'vec_reduce_all<float>'\n"
            "attention.cpp:112:47: error: another one\n")
    assert extension.build_failure_summary(text) == ("attention.cpp:96:42: error: no matching function for call to "
                                                     "'vec_reduce_all<float>'")
    assert extension.build_failure_summary("ninja: not found\nmore") == "ninja: not found"
    assert extension.build_failure_summary("") == "unknown error"

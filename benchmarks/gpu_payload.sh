#!/usr/bin/env bash
# Everything benchmarks/gpu_check.sh needs on a GPU machine without network, gathered here where pip
# reaches an index. The GPU machine is assumed to have python 3.12 on x86-64 with CUDA torch,
# triton, transformers, peft, accelerate, tensorboard, mpi4py, einops, msgpack, ninja, psutil,
# py-cpuinfo, tqdm and numpy, and no DeepSpeed.
#
#   bash benchmarks/gpu_payload.sh
#
# .whl/          DeepSpeed 0.19.8 (a pure-Python wheel built with `pip wheel --no-deps`: no op is
#                prebuilt, they build on first use), the requirements of it that such a machine lacks
#                (hjson, pydantic with its pydantic-core, annotated-types, typing-inspection,
#                typing-extensions), and the kernels kernel_bench.py compares against
#                (benchmarks/fetch_peer_wheels.sh: liger-kernel, cut-cross-entropy); binary wheels
#                for cp312 manylinux x86-64. One version of each: the folder's wheels are replaced.
# .gpu_payload/  the tokenizer and data the end-to-end run trains on (../shared/data/tokenizer-zh-6400,
#                ../shared/data/alpaca_zh_demo.json), since only the repository travels.
# Both folders are ignored by git (.gitignore). Prints their sizes; fails above 50 MiB, since what
# travels with the repository is limited.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=../shared/data
deepspeed_version=0.19.8
pydantic_version=2.13.4
pure=(hjson==3.1.0 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0)
limit_mib=50

for folder in .whl .gpu_payload; do
  git check-ignore -q "$folder/" || { echo "error: $folder/ is not ignored by git; add it to .gitignore" >&2; exit 1; }
done
[[ -f $shared/alpaca_zh_demo.json && -f $shared/tokenizer-zh-6400/tokenizer.json ]] \
  || { echo "error: $shared/alpaca_zh_demo.json or $shared/tokenizer-zh-6400/ is missing" >&2; exit 1; }

mkdir -p .whl
rm -f .whl/*.whl

# DeepSpeed: an sdist on PyPI; its wheel must hold no compiled op (it would be this machine's build).
python3 -m pip wheel -q --no-deps -w .whl "deepspeed==$deepspeed_version"
python3 - "$deepspeed_version" <<'EOF'
import glob, sys, zipfile
version = sys.argv[1]
wheels = glob.glob(f".whl/deepspeed-{version}-*.whl")
assert len(wheels) == 1 and wheels[0].endswith("-py3-none-any.whl"), f"not one pure-Python wheel: {wheels}"
names = zipfile.ZipFile(wheels[0]).namelist()
compiled = [n for n in names if n.endswith((".so", ".pyd", ".dll"))]
assert not compiled, f"{wheels[0]} holds compiled files: {compiled[:5]}"
print(f"{wheels[0]}: pure Python ({len(names)} files, no compiled op)")
EOF

bash benchmarks/fetch_peer_wheels.sh .whl >/dev/null

download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"
}
download "pydantic==$pydantic_version" "${pure[@]}"
# pydantic pins its compiled core exactly: take the version its metadata names.
core=$(unzip -p .whl/pydantic-"$pydantic_version"-*.whl '*/METADATA' \
  | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
[[ -n $core ]] || { echo "error: no pydantic-core pin in pydantic $pydantic_version's metadata" >&2; exit 1; }
download "pydantic-core==$core"

rm -rf .gpu_payload
mkdir -p .gpu_payload
cp -r "$shared/tokenizer-zh-6400" "$shared/alpaca_zh_demo.json" .gpu_payload/

ls -l .whl/*.whl | awk '{printf "%9d  %s\n", $5, $NF}'
du -sh .whl .gpu_payload
total_kib=$(du -sk .whl .gpu_payload | awk '{s += $1} END {print s}')
echo "gpu_payload total=$((total_kib / 1024))MiB ($total_kib KiB) wheels=$(ls .whl/*.whl | wc -l) limit=${limit_mib}MiB"
(( total_kib <= limit_mib * 1024 )) || { echo "error: payload over ${limit_mib} MiB" >&2; exit 1; }

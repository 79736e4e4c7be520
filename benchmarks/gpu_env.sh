# Shared by benchmarks/gpu_kernels.sh and benchmarks/gpu_check.sh (sourced, from the repo root).
#
#   source benchmarks/gpu_env.sh
#   install_carried_wheels      # .whl/*.whl -> a private target, first on PYTHONPATH; sets wheels_rc, wheels_note
#   print_environment           # GPU, python, torch/triton/deepspeed/transformers, the carried packages
#
# The wheels in .whl/ (benchmarks/gpu_payload.sh) are for python 3.12 on x86-64, the GPU machine's.
# Under that python they are installed with --no-index into ZHILING_SITE (default /tmp/zhiling-site)
# and used; under another python they are only installed for 3.12 (pip's --python-version), which
# proves the set is complete and installs offline, and the local packages stay in use. Installing
# twice with the same wheels is a no-op (a stamp in the target), so both scripts can call it.

WHEELS_PYTHON="3.12"
WHEELS_PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
                  manylinux1_x86_64)
ZHILING_SITE="${ZHILING_SITE:-/tmp/zhiling-site}"
wheels_rc=0
wheels_note="no .whl/ (local packages)"

install_carried_wheels() {
  wheels_rc=0
  compgen -G ".whl/*.whl" >/dev/null || { wheels_note="no .whl/ (local packages)"; return 0; }
  local here stamp target flags=() platform n
  n=$(ls .whl/*.whl | wc -l)
  here=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  stamp="$(ls -l .whl/*.whl | md5sum | cut -c1-32) $here"
  target="$ZHILING_SITE"
  if [[ "$here" != "$WHEELS_PYTHON" ]]; then
    target="$ZHILING_SITE-py$WHEELS_PYTHON"
    flags=(--python-version "$WHEELS_PYTHON" --implementation cp --only-binary=:all:)
    for platform in "${WHEELS_PLATFORMS[@]}"; do flags+=(--platform "$platform"); done
  fi
  if [[ "$(cat "$target/.zhiling-wheels" 2>/dev/null)" != "$stamp" ]]; then
    rm -rf "$target"
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
         --target "$target" "${flags[@]}" .whl/*.whl; then
      echo "$stamp" >"$target/.zhiling-wheels"
    else
      wheels_rc=1
      wheels_note="$n wheels from .whl/ did NOT install into $target"
      return 1
    fi
  fi
  if [[ "$here" == "$WHEELS_PYTHON" ]]; then
    case ":${PYTHONPATH:-}:" in
      *":$target:"*) ;;
      *) export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" ;;
    esac
    export PATH="$target/bin:$PATH"  # the deepspeed launcher
    wheels_note="$n wheels from .whl/ installed (--no-index) into $target and in use"
  else
    wheels_note="$n wheels from .whl/ installed for python $WHEELS_PYTHON (--no-index) into $target;"
    wheels_note+=" python $here keeps its own packages"
  fi
}

print_environment() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  else
    echo "nvidia-smi: not available"
  fi
  python3 - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "deepspeed", "transformers", "peft", "pydantic", "liger_kernel", "cut_cross_entropy"):
    try:
        module = importlib.import_module(name)
        where = "" if "site-packages" in (getattr(module, "__file__", "") or "") else f" ({module.__file__})"
        print(name, getattr(module, "__version__", "?") + where)
    except Exception as error:  # a missing peer is reported, not fatal
        print(name, f"not importable: {type(error).__name__}: {str(error)[:160]}")
import torch
print("cuda", torch.version.cuda, "available" if torch.cuda.is_available() else "NOT available",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
  echo "wheels: $wheels_note"
}

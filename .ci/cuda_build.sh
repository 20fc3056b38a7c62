#!/usr/bin/env bash
# CI: builds fastgrad._C with nvcc against the CUDA build of torch (on a machine with nvcc but no
# GPU), imports it, and checks that every kernel of a TORCH_LIBRARY_IMPL block in csrc/ is
# registered for its dispatch key (CUDA for csrc/cuda/*.cu, CPU for csrc/cpu/*.cpp) and that the
# .so carries SASS for every requested arch.
#
# The CUDA torch lives in its own venv outside the repo (default ~/.cache/fastgrad-ci/cuda-venv),
# reused by later runs on the same machine. Its wheels (2.6 GB: torch+cu130 and the nvidia-* CUDA 13
# libraries) are kept in a wheelhouse next to it, so a rebuilt venv installs without downloading:
# pip's own HTTP cache is not enough, it keeps nothing when the index sends no cache headers. The
# extension is built from a temporary copy of the working tree: no .so or build/ is left in the
# repo to shadow the CPU build the tests use.
#
# Environment: FASTGRAD_CUDA_VENV, FASTGRAD_CUDA_WHEELS (the wheelhouse, default
# ~/.cache/fastgrad-ci/wheels), FASTGRAD_CUDA_ARCHS (default "8.0;8.6;8.9;9.0;12.0"; 12.0 is
# dropped when nvcc does not know sm_120), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (2),
# FASTGRAD_CUDA_PYTHON (the interpreter the venv is made from, default python3),
# FASTGRAD_CUDA_BUILD_DIR (build there, outside the repo, and keep it; default: a temporary
# directory, removed at exit).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

torch_version=2.13.0
venv=${FASTGRAD_CUDA_VENV:-$HOME/.cache/fastgrad-ci/cuda-venv}
wheels=${FASTGRAD_CUDA_WHEELS:-$HOME/.cache/fastgrad-ci/wheels}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
nvcc=$CUDA_HOME/bin/nvcc
py=$venv/bin/python

t_start=$SECONDS
phase_start=$SECONDS
declare -a timings=()
phase_done() {  # records the seconds since the previous phase ended
  timings+=("$(printf '%-26s %5ds' "$1" $((SECONDS - phase_start)))")
  echo "== $1: $((SECONDS - phase_start))s"
  phase_start=$SECONDS
}
fail() {
  echo "cuda_build.sh: $*" >&2
  exit 1
}

[[ -x "$nvcc" ]] || fail "no nvcc at $nvcc (set CUDA_HOME)"
"$nvcc" --version | tail -n 2

# --- arch list: sm_120 only if this nvcc can target it ------------------------------------------
archs=${FASTGRAD_CUDA_ARCHS:-"8.0;8.6;8.9;9.0;12.0"}
known=$("$nvcc" --list-gpu-arch)
kept=()
IFS=';' read -ra requested <<<"$archs"
for a in "${requested[@]}"; do
  if grep -qx "compute_${a/./}" <<<"$known"; then
    kept+=("$a")
  elif [[ "$a" == 12.0 && -z "${FASTGRAD_CUDA_ARCHS:-}" ]]; then
    echo "nvcc does not support sm_120: building without it"
  else
    fail "nvcc does not support the requested arch $a"
  fi
done
archs=$(IFS=';' && echo "${kept[*]}")
export TORCH_CUDA_ARCH_LIST=$archs
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

# --- the venv with the CUDA torch ---------------------------------------------------------------
venv_ok() {
  [[ -x "$py" ]] && "$py" - "$torch_version" <<'EOF' 2>/dev/null
import sys

import ninja, numpy, setuptools, torch, wheel  # noqa: E401,F401

sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)
EOF
}

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
if command -v flock >/dev/null; then flock 9; fi  # one CI run at a time builds the venv
if venv_ok; then
  echo "reusing $venv"
else
  echo "creating $venv"
  ${FASTGRAD_CUDA_PYTHON:-python3} -m venv --clear "$venv"
  # --isolated: no pip configuration, so the index's CUDA wheel is picked and not a local CPU one
  # (this drops the PIP_* settings too, hence cert and timeout passed explicitly).
  pip_args=(--isolated --disable-pip-version-check --timeout "${PIP_DEFAULT_TIMEOUT:-180}" --retries 5)
  [[ -n "${PIP_CERT:-}" ]] && pip_args+=(--cert "$PIP_CERT")
  reqs=("torch==$torch_version" ninja "setuptools>=68" wheel numpy)
  mkdir -p "$wheels"
  # From the wheelhouse alone when it has everything; else download what is missing into it first.
  if ! "$py" -m pip install "${pip_args[@]}" --no-index --find-links "$wheels" "${reqs[@]}" 2>/dev/null; then
    "$py" -m pip download "${pip_args[@]}" --dest "$wheels" "${reqs[@]}"
    "$py" -m pip install "${pip_args[@]}" --no-index --find-links "$wheels" "${reqs[@]}"
  fi
  venv_ok || fail "$venv: torch $torch_version with CUDA did not install (got $("$py" -c \
    'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -n 1))"
fi
exec 9>&-
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
export PATH=$venv/bin:$PATH  # torch's BuildExtension runs `ninja` from PATH
phase_done "venv (download/install)"

# --- build from a temporary copy of the working tree -------------------------------------------
if [[ -n "${FASTGRAD_CUDA_BUILD_DIR:-}" ]]; then  # kept afterwards (to inspect or reuse the build)
  tmp=$FASTGRAD_CUDA_BUILD_DIR
  rm -rf "$tmp/src"
  mkdir -p "$tmp"
else
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/fastgrad-cuda-build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
fi
mkdir "$tmp/src"
# Tracked and untracked-but-not-ignored files that exist (no .so, build/ or egg-info).
git -C "$repo" ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
  if [[ -f "$f" ]]; then printf '%s\0' "$f"; fi  # not a tracked file deleted in the working tree
done | tar --null -T - -cf - | tar -C "$tmp/src" -xf -
(
  cd "$tmp/src"
  "$py" setup.py build_ext --inplace --build-temp "$tmp/build"
)
so=$(ls "$tmp"/src/fastgrad/_C*.so)
echo "built $so ($(du -h "$so" | cut -f1))"
phase_done "compile"

# --- checks -------------------------------------------------------------------------------------
# SASS for every requested arch: `cuobjdump --list-elf` names one cubin per arch (…sm_80.cubin).
# The toolkit's, else the one Triton (a dependency of the CUDA torch) ships.
triton_bin=$("$py" -c 'import os, triton; print(os.path.dirname(triton.__file__))' 2>/dev/null || true)
triton_bin=${triton_bin:+$triton_bin/backends/nvidia/bin}
cuobjdump=""
for c in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" "${triton_bin:+$triton_bin/cuobjdump}"; do
  if [[ -n "$c" && -x "$c" ]]; then
    cuobjdump=$c
    break
  fi
done
[[ -n "$cuobjdump" ]] || fail "no cuobjdump (neither in \$CUDA_HOME/bin, on PATH nor in the venv's triton)"
elfs=$("$cuobjdump" --list-elf "$so")
echo "$elfs"
missing=()
for a in "${kept[@]}"; do
  grep -q "\.sm_${a/./}\.cubin" <<<"$elfs" || missing+=("sm_${a/./}")
done
((${#missing[@]} == 0)) || fail "no SASS for ${missing[*]} in $so"
echo "SASS for every arch: ${kept[*]}"

# Dispatch keys: the expected (key, op) pairs are read from the TORCH_LIBRARY_IMPL(fastgrad, KEY, m)
# blocks of the copied sources. No GPU is visible and TRITON_INTERPRET is unset, so no Triton kernel
# registers on CUDA: a CUDA kernel found there comes from fastgrad._C.
(
  cd "$tmp/src"
  env -u TRITON_INTERPRET -u FASTGRAD_NO_EXT CUDA_VISIBLE_DEVICES="" "$py" - <<'EOF'
import pathlib
import re
import sys

import torch

src = pathlib.Path.cwd().resolve()
block = re.compile(r"TORCH_LIBRARY_IMPL\(\s*fastgrad\s*,\s*(\w+)\s*,\s*(\w+)\s*\)\s*\{")
expected: dict[str, dict[str, str]] = {}  # dispatch key -> op -> source file
for path in sorted([*src.glob("csrc/**/*.cpp"), *src.glob("csrc/**/*.cu")]):
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", path.read_text(), flags=re.S)
    for m in block.finditer(text):
        key, var = m.groups()
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        for op in re.findall(rf'\b{var}\s*\.\s*impl\(\s*"([^"]+)"', text[m.end() : i]):
            expected.setdefault(key, {})[op] = str(path.relative_to(src))
for key in ("CUDA", "CPU"):
    if not expected.get(key):
        sys.exit(f"no TORCH_LIBRARY_IMPL(fastgrad, {key}, m) kernels found in csrc/: the parser is out of date")

import fastgrad  # noqa: E402,F401  (defines the ops, loads fastgrad._C)
from fastgrad import _backends  # noqa: E402

if _backends.EXTENSION_ERROR:
    sys.exit(f"fastgrad._C did not load: {_backends.EXTENSION_ERROR}")
from fastgrad import _C  # noqa: E402

print(f"fastgrad._C: {_C.__file__}, with_cuda={_C.with_cuda}, torch.cuda.is_available()={torch.cuda.is_available()}")
if pathlib.Path(_C.__file__).resolve().parent != src / "fastgrad":
    sys.exit("imported a fastgrad._C other than the one just built")
if not _C.with_cuda:
    sys.exit("fastgrad._C was built without CUDA (setup.py found no CUDA torch or no CUDA_HOME)")
bad = []
for key, ops in sorted(expected.items()):
    for op, where in sorted(ops.items()):
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgrad::{op}", key)
        print(f"  {key:5s} fastgrad::{op:34s} {'ok' if ok else 'MISSING'}  ({where})")
        if not ok:
            bad.append(f"{op} ({key}, {where})")
if bad:
    sys.exit("not registered: " + ", ".join(bad))
counts = ", ".join(f"{k}: {len(v)}" for k, v in sorted(expected.items()))
print(f"{sum(map(len, expected.values()))} kernels registered ({counts})")
EOF
)
phase_done "checks"

echo "== cuda_build.sh passed in $((SECONDS - t_start))s (archs: $TORCH_CUDA_ARCH_LIST)"
printf '   %s\n' "${timings[@]}"

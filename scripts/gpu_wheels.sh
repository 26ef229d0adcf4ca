#!/usr/bin/env bash
# Download the wheels a GPU machine without a package index needs for scripts/gpu_check.sh into an ignored
# folder (default .whl/, listed in .gitignore): diffusers, peft, transformers and bitsandbytes at the versions
# this checkout's .venv tested, plus regex (transformers checks its version at import), for the GPU machine's
# Python (default 3.12, x86-64 manylinux; GPU_PYTHON_VERSION=3.11 etc. for another). Carry the folder to the GPU
# machine with the working tree; gpu_check.sh installs it there with `pip install --no-index --target`.
#
# bitsandbytes' wheel holds one 4-26 MB library per CUDA release (43 MB in all); only the libraries of the GPU
# torch's CUDA major are kept (GPU_CUDA_LIBS, default cuda13: the cu130 torch of the lent H100/H200 machines),
# so the wheels stay far below the 64 MiB a device call carries. GPU_CUDA_LIBS=all keeps every library.
#
#   bash scripts/gpu_wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
pyver=${GPU_PYTHON_VERSION:-3.12}
cuda_libs=${GPU_CUDA_LIBS:-cuda13}
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3

# the tested versions: what this checkout's environment runs the test suite with
specs=$("$py" - <<'PY'
import importlib.metadata as m
print(" ".join(f"{d}=={m.version(d)}" for d in ("diffusers", "peft", "transformers", "bitsandbytes", "regex")))
PY
)
mkdir -p "$dest"
for spec in $specs; do  # one version of each: two wheels of one package stop the install on the GPU machine
    name=${spec%%==*}
    find "$dest" -maxdepth 1 -name "${name}-*.whl" ! -name "${name}-${spec#*==}-*" -delete
done
echo "gpu_wheels: $specs for CPython $pyver x86-64 -> $dest/"
# pip matches manylinux_2_N exactly: the tags the GPU machine's glibc accepts, newest first
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
           manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
# shellcheck disable=SC2086
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${platforms[@]}" -d "$dest" $specs

"$py" - "$dest" "$cuda_libs" <<'PY'
"""Rewrite bitsandbytes' wheel with only the CUDA libraries named (its RECORD rewritten to match)."""
import glob
import os
import re
import sys
import zipfile

dest, keep = sys.argv[1], sys.argv[2]
if keep != "all":
    for path in glob.glob(os.path.join(dest, "bitsandbytes-*.whl")):
        dropped = lambda name: (re.search(r"libbitsandbytes_(cuda|rocm|xpu)\w*\.so$", name)
                                and not re.search(rf"libbitsandbytes_{keep}\w*\.so$", name))
        with zipfile.ZipFile(path) as src:
            names = src.namelist()
            if not any(dropped(n) for n in names):
                continue  # already slimmed
            tmp = path + ".tmp"
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
                for info in src.infolist():
                    if dropped(info.filename):
                        continue
                    data = src.read(info.filename)
                    if info.filename.endswith(".dist-info/RECORD"):
                        lines = data.decode().splitlines()
                        data = ("\n".join(l for l in lines if not dropped(l.split(",")[0])) + "\n").encode()
                    out.writestr(info, data)
        os.replace(tmp, path)
        print(f"gpu_wheels: {os.path.basename(path)}: kept the {keep}* CUDA libraries only")
total = 0
for path in sorted(glob.glob(os.path.join(dest, "*.whl"))):
    size = os.path.getsize(path)
    total += size
    print(f"  {size / 2**20:6.1f} MiB  {os.path.basename(path)}")
print(f"gpu_wheels: {total / 2**20:.1f} MiB in {dest}/ (a device call carries at most 64 MiB with the tree)")
PY

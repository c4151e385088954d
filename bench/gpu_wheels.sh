#!/usr/bin/env bash
# Fills .whl/ with the wheels bench/gpu_check.py installs on the device machine (Python 3.12, x86-64, offline), and
# writes .whl/GIT_SHA (the device copy of the tree has no git). Run here, from anywhere in the checkout:
#
#     bash bench/gpu_wheels.sh
#
# What travels and why (the device image has torch 2.11, triton 3.6, transformers 5.17, peft, numpy, packaging):
#   liger-kernel, cut-cross-entropy   kernel peers of bench_kernels.py, and the cli part's --liger (pure Python)
#   torchao                           the memory rungs that can meet <= 20 GiB (8bit, offload), the train part's
#                                     8bit plan, and the qlora part's NF4 base (NF4Tensor). Not pure Python: a
#                                     cp310-abi3 manylinux wheel whose C++ extensions may not load against the
#                                     image's torch (torchao then warns); the optimizers used are Python +
#                                     torch.compile and NF4Tensor is a Python tensor subclass, which is why it serves.
#                                     (peft, for qlora's adapters, is on the image; the probe records its version)
#   pytest + pluggy, iniconfig, pygments   the pytest part (the CUDA test files); pytest's other need, packaging, is
#                                     on the image. math-verify is not carried: no part uses the math reward.
# The versions are the ones the CPU test environment runs (setup.py's extras). Wheels of other projects already in
# .whl/ stay; an older wheel of a project listed here is removed, because two versions of one project make pip refuse
# the whole install (gpu_check.py would then install them one by one and report the clash).
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
PY=${PYTHON:-python3}
WHEELS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 torchao==0.18.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
        pygments==2.21.0)
LIMIT_MIB=48  # the tree and .whl travel together under the device tool's 64 MiB: keep 16 MiB of room

if ! git check-ignore -q .whl/x.whl; then
    echo "gpu_wheels.sh: .whl/ is not git-ignored here; add '/.whl/' to .gitignore first" >&2
    exit 1
fi
mkdir -p .whl
for spec in "${WHEELS[@]}"; do  # wheel file names spell the project with underscores, lower case
    name=$(echo "${spec%%==*}" | tr 'A-Z-' 'a-z_')
    rm -f .whl/"${name}"-*.whl
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"
git describe --always --dirty --abbrev=12 > .whl/GIT_SHA

dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "gpu_wheels.sh: two wheels of: $dupes (remove one: pip refuses the install)" >&2
    exit 1
fi
whl_bytes=$(du -cb .whl/* | tail -1 | cut -f1)
# what travels besides: tracked files and untracked files git does not ignore
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total_mib=$(( (whl_bytes + tree_bytes) / 1048576 ))
echo "gpu_wheels.sh: .whl/ $(( whl_bytes / 1024 )) KiB ($(ls .whl/*.whl | wc -l) wheels), tree $(( tree_bytes / 1024 )) KiB, together ${total_mib} MiB (limit ${LIMIT_MIB} MiB of the device tool's 64); GIT_SHA $(cat .whl/GIT_SHA)"
if [ "$total_mib" -ge "$LIMIT_MIB" ]; then
    echo "gpu_wheels.sh: over ${LIMIT_MIB} MiB: the call might not travel" >&2
    exit 1
fi

#!/usr/bin/env bash
# Build the two carry folders that bring FlashAttention-4 (flash-attn-4, CuTe DSL kernels) to a
# device machine without network, within the 64 MiB a call may carry (notes/perf.md, round 3).
#
#   bash scripts/make_fa4_carry.sh            # writes .fa4p1/ and .fa4p2/ (git-ignored)
#
# The 92 MB nvidia-cutlass-dsl-libs-cu13 wheel is unpacked, re-packed as one xz stream and
# split: .fa4p1/part.00 travels with a first call that copies it to /tmp/stash; .fa4p2/ (the
# second part and the small wheels) travels with the next call, on the same warm machine
# (30 s window), which installs everything:
#
#   S=/tmp/fa4site; mkdir -p $S
#   python3 -m pip install -q --no-index --no-deps --no-compile --target $S .fa4p2/*.whl
#   cat /tmp/stash/part.00 .fa4p2/part.01 | xz -d -T8 | tar -x -C $S
#   export PYTHONPATH=$S:$S/nvidia_cutlass_dsl/dsl_packages:.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pins=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
      nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2
      torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$work/wheels" "${pins[@]}"
mkdir -p "$work/libs"
(cd "$work/libs" && python3 -m zipfile -e "$work"/wheels/nvidia_cutlass_dsl_libs_cu13-*.whl .)
tar -C "$work/libs" -cf - . | xz -9 -T2 > "$work/libs.tar.xz"
rm -rf .fa4p1 .fa4p2 && mkdir -p .fa4p1 .fa4p2
split -b 44000000 -d "$work/libs.tar.xz" "$work/part."
mv "$work/part.00" .fa4p1/ && mv "$work/part.01" .fa4p2/
find "$work/wheels" -name '*.whl' ! -name 'nvidia_cutlass_dsl_libs_cu13-*' -exec cp {} .fa4p2/ \;
for d in /.fa4p1/ /.fa4p2/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
du -sh .fa4p1 .fa4p2

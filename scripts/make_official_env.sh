#!/usr/bin/env bash
# Prepare what the official leg needs on a device machine that has no network:
#
#   bash scripts/make_official_env.sh OFFICIAL_CHECKOUT DEST     (e.g. /work/ref/hy .official)
#
# DEST/wheels/    the official pins that the device lacks or has in other versions, as
#                 Python 3.12 manylinux x86_64 wheels (downloaded here with pip, --no-deps):
#                 diffusers 0.35.0 (official pin; 0.42 changed APIs it uses), transformers 4.57.6
#                 (diffusers 0.35 does not import with transformers 5), huggingface_hub 0.36.0
#                 and tokenizers 0.22.1 (what transformers 4.57 accepts), remote_pdb (imported
#                 by wan/utils.py). Everything else the imported official modules need is on the
#                 device image already: numpy, scipy, einops, pillow, regex, tqdm, imageio,
#                 cloudpickle, filelock, pyyaml, safetensors, typing_extensions, accelerate.
#                 ftfy is optional (guarded import; only the prompt cleaner, unused with
#                 prompt embeddings); loguru/moviepy are only needed by hyvideo/generate.py,
#                 which the leg does not import.
# DEST/official/  the official files the leg imports (wan/: inference, models, distributed,
#                 platforms, third_party/pynvml, utils.py; hyvideo/: __init__, commons, prope,
#                 utils/retrieval_context.py; plus hyvideo/generate*.py for the pose functions
#                 that scripts/check_pose_vs_official.py reads), exported with `git archive`
#                 at the checkout's HEAD, and COMMIT holding that commit; also the example
#                 image assets/img/1.png (1.3 MB) as a first frame for device runs.
#
# DEST must be ignored by git (.official/ is in .git/info/exclude) and named in `carry`.
# On the device:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/offsite DEST/wheels/*.whl
#   PYTHONPATH=/tmp/offsite python3 -m torch.distributed.run --nproc_per_node=1 \
#       scripts/official_rollout.py --official DEST/official ...
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 OFFICIAL_CHECKOUT DEST" >&2
    exit 2
fi
CHECKOUT=$1
DEST=$2
EXPECTED_COMMIT=da2d0c26eb0edb647f56e164ffd966490eb75282
PYTHON=${PYTHON:-python3}

if [ ! -f "$CHECKOUT/wan/inference/pipeline_wan_w_mem_relative_rope.py" ]; then
    echo "$CHECKOUT: not an HY-WorldPlay checkout (no wan/inference/pipeline_wan_w_mem_relative_rope.py)" >&2
    exit 2
fi

WHEELS=(
    diffusers==0.35.0
    transformers==4.57.6
    huggingface_hub==0.36.0
    tokenizers==0.22.1
    remote_pdb==2.1.0
)

mkdir -p "$DEST/wheels"
DEST=$(cd "$DEST" && pwd)
rm -f "$DEST"/wheels/*.whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST/wheels" "${WHEELS[@]}"

# The official files (read-only export; never committed).
PATHS=(
    wan/__init__.py
    wan/utils.py
    wan/inference
    wan/models
    wan/distributed
    wan/platforms
    wan/third_party
    wan/logging_utils
    hyvideo/__init__.py
    hyvideo/commons
    hyvideo/prope
    hyvideo/utils/retrieval_context.py
    hyvideo/generate.py
    hyvideo/generate_custom_trajectory.py
    assets/img/1.png
)
rm -rf "$DEST/official"
mkdir -p "$DEST/official"
if git -C "$CHECKOUT" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    COMMIT=$(git -C "$CHECKOUT" rev-parse HEAD)
    git -C "$CHECKOUT" archive --format=tar HEAD -- "${PATHS[@]}" | tar -x -C "$DEST/official"
else
    COMMIT=unknown
    (cd "$CHECKOUT" && cp -r --parents "${PATHS[@]}" "$DEST/official")
fi
echo "$COMMIT" >"$DEST/official/COMMIT"
if [ "$COMMIT" != "$EXPECTED_COMMIT" ]; then
    echo "warning: checkout is at $COMMIT, the leg was written against $EXPECTED_COMMIT" >&2
fi

echo "== $DEST"
(cd "$DEST" && ls -l wheels | awk 'NR>1 {printf "%10d  wheels/%s\n", $5, $9}')
du -sb "$DEST/official" | awk '{printf "%10d  official/ (%s)\n", $1, "'"$COMMIT"'"}'
du -sb "$DEST" | awk '{printf "%10d  total (%.1f MiB)\n", $1, $1/1048576}'

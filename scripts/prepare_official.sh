#!/usr/bin/env bash
# One command for the official side-by-side in `nox -s bench` (the official leg) on a machine
# with network:
#
#   bash scripts/prepare_official.sh .official
#
# clones Tencent-Hunyuan/HY-WorldPlay at the pinned commit into DEST/src, exports the files the
# leg imports and downloads the official pins as wheels (scripts/make_official_env.sh), installs
# those wheels into DEST/site, then prints the bench command. Without it `nox -s bench` still
# runs the native legs and reports the official leg as skipped, with the reason.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DEST   (e.g. .official; keep it out of git)" >&2
    exit 2
fi
DEST=$1
COMMIT=da2d0c26eb0edb647f56e164ffd966490eb75282
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)

mkdir -p "$DEST"
if [ ! -d "$DEST/src/.git" ]; then
    git clone --quiet https://github.com/Tencent-Hunyuan/HY-WorldPlay "$DEST/src"
fi
git -C "$DEST/src" checkout --quiet "$COMMIT"
bash "$HERE/make_official_env.sh" "$DEST/src" "$DEST"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$DEST/site" "$DEST"/wheels/*.whl
DEST=$(cd "$DEST" && pwd)
echo "official checkout ready; run the bench with its official leg:"
echo "  PYTHONPATH=$DEST/site nox -s bench -- --official $DEST/official"

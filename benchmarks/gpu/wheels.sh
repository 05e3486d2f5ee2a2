#!/usr/bin/env bash
# The pure-Python packages the GPU run needs that the GPU image lacks, as wheels in .whl/ (git-ignored
# through .git/info/exclude), for the device call to carry: diffusers (the ddim_loop bench baseline and the
# diffusers-oracle tests) and importlib_metadata, its one requirement missing there. 8.7.0: later versions
# need lazy-importer, also missing there. About 6.4 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "diffusers==${DIFFUSERS_VERSION:-0.42.1}" importlib_metadata==8.7.0
ls -l .whl

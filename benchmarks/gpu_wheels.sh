#!/usr/bin/env bash
# Wheels the device machine needs beside its own image (run here, once, before a GPU session): kvlab pins
# transformers 5.2 (its integration is verified against it), the image has 5.17; transformers 5.2 checks at
# import that tokenizers is <= 0.23.0 (0.22.2 here), the image has 0.23.2. benchmarks/gpu_run.sh installs whatever is in .whl/.
#   bash benchmarks/gpu_wheels.sh     -> .whl/ (ignored by git: .git/info/exclude); carry it: run(..., carry=[".whl"])
set -euo pipefail
mkdir -p .git/info && touch .git/info/exclude
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl transformers==5.2.0 tokenizers==0.22.2
ls -la .whl

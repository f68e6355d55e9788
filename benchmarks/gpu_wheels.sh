#!/usr/bin/env bash
# What a lent GPU machine lacks to run benchmarks/gpu_check.py, as wheels for its Python (3.12), fetched on this
# machine: its image holds torch, transformers, numpy, pillow, httpx, aiohttp, peft, prometheus-client, pytest…
# but none of Muse's web stack, and nothing can be downloaded there. Carry DIR with the working tree
# (ignored by git, named in the device tool's `carry`), then there:
#
#   bash benchmarks/gpu_wheels.sh .gpu-wheels                      # here: ~11 MB
#   python3 -m pip install -q --no-index --find-links .gpu-wheels .gpu-wheels/*.whl \
#     && python3 -m pip install -q --no-index --no-build-isolation --no-deps -e . \
#     && python3 benchmarks/gpu_check.py "$OUT/check"               # there
set -euo pipefail
DIR=${1:?usage: gpu_wheels.sh DIR [PYTHON_VERSION]}
VERSION=${2:-3.12}
PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64)
PYTHON=${PYTHON:-python3}
# Each package alone (no dependencies): the image's own versions of the rest stay as they are.
"$PYTHON" -m pip download -q --dest "$DIR" --python-version "$VERSION" --only-binary=:all: --no-deps \
    "${PLATFORMS[@]/#/--platform=}" \
    diffusers importlib-metadata starlette "uvicorn[standard]" h11 httptools websockets watchfiles python-dotenv \
    slack-bolt slack-sdk pydantic pydantic-core annotated-types typing-inspection python-multipart
ls "$DIR"

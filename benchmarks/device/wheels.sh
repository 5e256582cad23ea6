#!/usr/bin/env bash
# Run HERE (the CPU dev machine, which has a package index) before a GPU check: fills .whl/ with the
# packages the GPU image lacks, as Python 3.12 x86-64 wheels, for `device run carry=[".whl"]`.
# The GPU image already has torch, triton, numpy, yaml, safetensors, psutil, einops, msgpack, tqdm,
# fsspec, matplotlib (see the device tool's KINDS.md). DALI and flash-attn are too large for the 64 MiB
# carry limit, and the GPU machine reaches no package index: the GPU check cannot run them. DALI 2.4
# (nvidia-dali-cuda130) is a 198.7 MB wheel; libdali_operators.so alone is 98 MB compressed (232 MB
# raw), libdali_kernels.so 26 MB, CV-CUDA 16 MB; xz -9e of the unpacked tree passed 130 MB before it
# finished (2026-12-07). A slimmer DALI would mean pruning the CUDA fat binaries to one architecture
# (nvprune, from a CUDA toolkit this dev machine lacks) or building DALI from source with only the
# video and audio operators: not done.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7 py-cpuinfo==9.0.0
# DeepSpeed is a source package: build its pure-Python wheel (no ops compiled).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
du -sh .whl

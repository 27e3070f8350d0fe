#!/usr/bin/env bash
# One call on a lent GPU (a few minutes): the GPU correctness tests, then the benchmarks, logs under $OUT.
# Uses the torch and triton already on the machine; lit_distill comes from this checkout via PYTHONPATH.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python -m pytest -q -m gpu tests/test_kernels.py tests/test_fused_linear.py 2>&1 | tee "$out/gpu-tests.log" | tail -5
python -m bench --case logits --divergence forward_kl reverse_kl jsd --modes fwd+bwd fwd --out "$out" 2>&1 | tee "$out/bench-logits.log"
python -m bench --case fused_linear --divergence forward_kl --modes fwd+bwd --out "$out" 2>&1 | tee "$out/bench-fused.log"

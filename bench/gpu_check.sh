#!/usr/bin/env bash
# The GPU check, one script for one H100/H200 (≤ 8 minutes): the CUDA-graph decoding tests,
# decoding speed at base size (fp32 and bf16, eager and CUDA graphs, with the MarianMT peer), teacher training with Ray Train + DeepSpeed
# (ZeRO-2, bf16) on the GPU, and distillation throughput on the GPU.
#
# On the lent GPU machine (no registry there): build the pack here first,
#   bash ../shared/gpu/pack.sh           # -> .gpu-pack/ (Ray, DeepSpeed, MLflow for Python 3.12)
# then run from the repo root there:   bash bench/gpu_check.sh
# Figures land in $OUT (default bench/results/gpu); the console shows the tables.
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if [ -f .gpu-pack/setup.sh ]; then source .gpu-pack/setup.sh; fi
export RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, ray, deepspeed; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"
step() { echo; echo "=== $1 ($(date +%T))"; }

step "CUDA graph decoding tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/imitate_nat/test_graphs.py tests/imitate_nat/test_decode.py 2>&1 | tail -5 | tee "$OUT/graph_tests.txt"
step "decode speed, base size, fp32"
timeout 120 python3 bench/decode_speed.py --device cuda --dtype fp32 --repeats 3 --sentences 32 --json "$OUT/decode_fp32.json"
step "decode speed, base size, bf16"
timeout 90 python3 bench/decode_speed.py --device cuda --dtype bf16 --repeats 3 --sentences 32 --json "$OUT/decode_bf16.json"

step "teacher: Ray Train + DeepSpeed ZeRO-2 bf16 on the GPU"
WD=$(mktemp -d)
timeout 180 python3 -m orchestrator.cli run jobs/tiny.yaml --until teacher --no-progress \
  --set workdir="$WD" --set data.synthetic.train_size=5000 --set ray.include_dashboard=false \
  --set teacher.strategy=deepspeed --set teacher.zero_stage=2 --set teacher.precision=bf16 \
  --set teacher.gpus_per_worker=1 --set teacher.workers=1 --set teacher.max_steps=300 \
  --set teacher.eval_every=150 --set teacher.checkpoint_every=150 2>&1 | grep -v PlacementGroupCleaner | tail -20
python3 - "$WD" <<'PY' | tee "$OUT/teacher_gpu.txt"
import sys, glob
from imitate_nat.checkpoint import load_model
m, meta = load_model(f"{sys.argv[1]}/tiny/teacher/model.pt")
print("teacher model.pt restored:", type(m).__name__, meta)
print("deepspeed partitions:", sorted(p.split('/')[-1] for p in glob.glob(f"{sys.argv[1]}/tiny/teacher/ray/*/checkpoint_*/ds/*")))
PY

step "distillation throughput on the GPU"
timeout 150 python3 bench/distill_throughput.py --device cuda --no-actors --sentences 256 --json "$OUT/distill_gpu.json"
echo; echo "=== done ($(date +%T))"

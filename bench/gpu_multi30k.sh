#!/usr/bin/env bash
# Multi30k on one GPU, end to end: the job (teacher, distillation, student, evaluation), the
# paper's ablation (Table 2) and the report; sized for ~12 minutes on one H100/H200 (an
# estimate: so far only its CPU smoke run, GPUS=0 STEPS_SCALE=0.01 MAX_TRAIN=2000, has run).
#
# The GPU machine sees only this repository, so the data travels in an ignored folder:
#   echo /.data/ >> .git/info/exclude; mkdir -p .data && cp -r ../shared/data/multi30k .data/
#   bash ../shared/gpu/pack.sh                                  # -> .gpu-pack/
# then, on the machine, from the repo root:  bash bench/gpu_multi30k.sh
# Results land in $OUT (default bench/results/gpu_multi30k): summary, ablation and report markdown.
# STEPS_SCALE (default 1) multiplies the teacher and student steps, for a longer or shorter run;
# ABLATE=0 runs the job only (no ablation, no report); JOB_TIMEOUT (seconds, default none) stops
# the job early and still copies what it finished.
# GPUS=0 runs the same flow on the CPU (with STEPS_SCALE=0.01 and MAX_TRAIN=2000: a smoke test).
set -uo pipefail
OUT=${OUT:-bench/results/gpu_multi30k}
DATA=${DATA:-.data/multi30k}
SCALE=${STEPS_SCALE:-1}
GPUS=${GPUS:-1}
mkdir -p "$OUT"
if [ -f .gpu-pack/setup.sh ]; then source .gpu-pack/setup.sh; fi
export RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS=0
[ -f "$DATA/train.en" ] || { echo "no Multi30k at $DATA (see the header of $0)"; exit 2; }
WD=$(mktemp -d)
step() { echo; echo "=== $1 ($(date +%T))"; }
steps() { python3 -c "print(max(1, round($1 * $SCALE)))"; }

# GPU settings over jobs/multi30k.yaml: one GPU for every stage, bigger batches (the GPU is
# launch-bound at 2,048 tokens); precision stays the job's bf16 (torch autocast).
# ray.include_dashboard=false: the pack's slim Ray has no dashboard front end, and starting a
# local Ray that tries to serve it waits ~60 s before it gives up.
SETS=(--set workdir="$WD" --set data.dir="$DATA" --set ray.include_dashboard=false
      --set teacher.gpus_per_worker="$GPUS" --set student.gpus_per_worker="$GPUS"
      --set teacher.batch_tokens=4096 --set student.batch_tokens=4096
      --set teacher.max_steps="$(steps 2400)" --set student.max_steps="$(steps 1600)"
      --set teacher.eval_every=600 --set teacher.checkpoint_every=600
      --set student.eval_every=400 --set student.checkpoint_every=400
      --set distill.actors=1 --set distill.gpus_per_actor="$GPUS" --set distill.shards=4 --set eval.gpus="$GPUS")
if [ -n "${MAX_TRAIN:-}" ]; then SETS+=(--set data.max_train="$MAX_TRAIN" --set eval.latency_sentences=5); fi

step "multi30k job"
T0=$(date +%s)
${JOB_TIMEOUT:+timeout $JOB_TIMEOUT} python3 -m orchestrator.cli run jobs/multi30k.yaml "${SETS[@]}" --no-progress 2>&1 \
  | grep -v PlacementGroupCleaner | tee "$OUT/job.log" | grep -v "^\s*$" | tail -40
echo "job wall time: $(( $(date +%s) - T0 )) s"
python3 -m orchestrator.cli status jobs/multi30k.yaml "${SETS[@]}" 2>&1 | tail -12
cp "$WD/multi30k/evaluate/summary.md" "$OUT/summary.md" 2>/dev/null
for m in "$WD"/multi30k/*/manifest.json; do s=$(basename "$(dirname "$m")"); cp "$m" "$OUT/manifest.$s.json"; done
[ "${ABLATE:-1}" = 0 ] && { echo; echo "=== done, job only ($(date +%T))"; exit 0; }

step "ablation (Table 2)"
python3 -m orchestrator.cli ablate jobs/multi30k.yaml "${SETS[@]}" --no-progress 2>&1 | grep -v PlacementGroupCleaner | tail -20
cp "$WD/multi30k-ablate/ablation.md" "$OUT/ablation.md" 2>/dev/null

step "report"
python3 -m orchestrator.cli report "$WD/multi30k" --no-progress 2>&1 | tail -5
cp "$WD/multi30k/report/report.md" "$OUT/report.md" 2>/dev/null
echo; echo "=== done ($(date +%T))"

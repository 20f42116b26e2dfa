#!/usr/bin/env bash
# The demo runs on every deploy runtime (README, "Deploy on CPU"): for each demo model, `fit` with the
# demo config (its test is torch fp32), then `test` of its deploy.ckpt on torch int8, onnxruntime int8,
# torch bf16 and onnxruntime fp32; prints one line per test from its results file.
#
#   bash bench/deploy_demos.sh [WORK_DIR]     (about 25 minutes on 2 cores; WORK_DIR default ./deploy-demos)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-deploy-demos}
mkdir -p "$work" && cd "$work"
export PYTHONPATH=$repo REPMLP_DEMO_ROOT=${REPMLP_DEMO_ROOT:-$PWD/cache}
for spec in "classification repmlp_res_tiny" "classification resnet_tiny" "classification repvgg_a0_tiny" \
            "classification qarepvgg_a0_tiny" "segmentation demo" "face demo"; do
  set -- $spec
  task=$1 backbone=$2 name="$1-$2"
  extra=()
  if [ "$task" = classification ] && [ "$backbone" != repmlp_res_tiny ]; then
    extra=(--model.backbone "$backbone" --model.backbone_kwargs '{}')  # the demo's kwargs are RepMLP-ResNet's
  fi
  echo "== $name: fit"
  python -m "tasks.$task" fit "${extra[@]}" --trainer.logger.init_args.name "$name" > "$name.fit.log" 2>&1
  run=runs/$name/version_0
  for choice in "torch int8" "onnxruntime int8" "torch bf16" "onnxruntime fp32"; do
    set -- $choice
    echo "== $name: test on $1 $2"
    python -m "tasks.$task" test -c "$run/config.yaml" --ckpt_path "$run/deploy.ckpt" --runtime "$1" --precision "$2" \
      --trainer.logger.init_args.name "$name-$1-$2" > "$name-$1-$2.test.log" 2>&1
  done
done
python - <<'PY'
import glob, json
for path in sorted(glob.glob("runs/*/version_0/results*.json")):
    r = json.load(open(path))
    metric, t = r["primary_metric"], r.get("throughput") or {}
    print(f"{path.split('/')[1]:50s} {r['runtime']:12s} {r['precision']:5s} {metric}={r['metrics'].get(metric):.4f} "
          f"images/s={t.get('images_per_s', float('nan')):.1f} batch={t.get('batch_size')} threads={t.get('threads')}")
PY

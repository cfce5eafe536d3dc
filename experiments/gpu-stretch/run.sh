#!/usr/bin/env bash
# The two training runs that need more than a 2-core CPU, in one go on a CUDA machine (about 9 minutes):
#   1. rank-push spectrum matching of checkpoints/fast with 32 clips of every class a step;
#   2. the default trained on at the high noise levels (ln sigma ~ N(0, 2^2)) at batch 128, ending in a cooldown.
# Both models are exported, packed and split into 15 MB parts under $OUT. README.md beside this file says how to
# unpack and evaluate them. Sizes can be scaled down for a dry run on a CPU:
#   DEVICE=cpu PER_CLASS=24 RANK_MIN=0.3 RANK_PER_CLASS=2 HP_MIN=0.3 HP_STEPS=4 HP_BATCH=4 WHEELS=none \
#     OUT=/tmp/dry WORK=/tmp/dry-work DATA=/tmp/dry-work/data PY=.venv/bin/python bash experiments/gpu-stretch/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:?set OUT to the folder the packed models go to}
DEVICE=${DEVICE:-cuda}
PER_CLASS=${PER_CLASS:-800}          # built-in clips per class (the default's training set)
RANK_MIN=${RANK_MIN:-3.5}            # minutes of spectrum matching
RANK_PER_CLASS=${RANK_PER_CLASS:-32} # clips of every class a matching step
HP_MIN=${HP_MIN:-3.2}                # minutes of training the default
HP_STEPS=${HP_STEPS:-800}            # its steps, the last all in the cooldown
HP_BATCH=${HP_BATCH:-128}
WORK=${WORK:-runs/gpu-stretch}
DATA=${DATA:-data/builtin}         # synthesized here when missing
mkdir -p "$OUT" "$WORK"
WHEELS=${WHEELS:-.whl}       # packages the machine lacks, carried as wheels ('none': use the installed ones)
if [ -d "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
E="$PY -m edmsound.cli"
say() { echo "[$(date +%T)] $*"; }
CLASSES="dog_bark footstep gunshot keyboard moving_motor_vehicle rain sneeze_cough"

say "data: $PER_CLASS clips per class"
if [ ! -d "$DATA" ]; then
  for c in $CLASSES; do $E data synth --out "$WORK/parts/$c" --per-class "$PER_CLASS" --seed 0 --classes "$c" >/dev/null 2>&1 & done
  wait
  mkdir -p "$DATA"
  for c in $CLASSES; do mv "$WORK/parts/$c/$c" "$DATA"/; done
fi

say "1. rank-push spectrum matching of checkpoints/fast"
$E match-spectrum --teacher checkpoints/fast --data "$DATA" --out "$WORK/rank" --guided --push rank \
  --per-class "$RANK_PER_CLASS" --lr 2e-5 --weight 0.005 --momentum 0.8 --ema-halflife 100 --checkpoint-every 100 \
  --steps 100000 --max-minutes "$RANK_MIN" --device "$DEVICE" --no-progress 2>&1 | tail -n 4
tail -n 3 "$WORK/rank/log.csv"
$E export --run "$WORK/rank" --out "$WORK/export/rank" --ema-only | tail -n 2

say "2. the default at the high noise levels, batch $HP_BATCH"
START=$($PY -c "import json; print(json.load(open('checkpoints/default/info.json'))['steps'])")
$E train --preset default --data "$DATA" --out "$WORK/hp" --init checkpoints/default --freq-scale whiten-class \
  --lr 1e-4 --cooldown "$HP_STEPS" --steps $((START + HP_STEPS)) --ema-halflife 150 --p-mean 0 --p-std 2 \
  --sigma-max 15 --rho 2.5 --sigma-min 0.002 --batch-size "$HP_BATCH" --device "$DEVICE" \
  --max-minutes "$HP_MIN" --no-progress 2>&1 | tail -n 4
tail -n 3 "$WORK/hp/log.csv"
$E export --run "$WORK/hp" --out "$WORK/export/hp" --sampler dpmpp_2m --nfe 8 --guidance 1 --guidance-interval 8,20 \
  --sigma-max 15 --rho 2.5 --sigma-min 0.002 | tail -n 2

$PY -c "
import json
a, b = (json.load(open(p + '/config.json'))['preset']['codec'] for p in ('$WORK/export/hp', 'checkpoints/default'))
print('per-bin and per-class gains', 'as the default\'s' if a == b else 'DIFFER from the default\'s: its guide will not attach')"

say "packing"
cp "$WORK/rank/log.csv" "$WORK/export/rank/train_log.csv" 2>/dev/null
cp "$WORK/hp/log.csv" "$WORK/export/hp/train_log.csv" 2>/dev/null
tar -C "$WORK" -cf - export | split -b 15m - "$OUT/models.tar.part-"
ls -la "$OUT"
say "done"

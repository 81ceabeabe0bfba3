#!/usr/bin/env bash
# The main job: quantize the shared ViT-Ti at W4/A4 with I&S-ViT (fast preset, about 10 minutes on
# 2 CPU cores) and print full precision vs quantized top-1 on all of imagenet-val-1300. Extra
# arguments go to `isvit quantize` and win over these (e.g. --method repq for a 2-minute run).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VENV/bin/isvit" quantize \
    --model vit_tiny_patch16_224 \
    --weights "$SHARED/models/vit_tiny_patch16_224.safetensors" \
    --calib "$SHARED/data/imagenet-calib-1000" \
    --data "$SHARED/data/imagenet-val-1300" \
    --method isvit --preset fast --w-bits 4 --a-bits 4 "$@"

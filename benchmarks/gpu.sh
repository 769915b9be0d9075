#!/usr/bin/env bash
# One prepared command: the surgery benchmark on a CUDA machine at Wan 1.3B in bfloat16 with a
# realistic streaming chunk (3 latent frames at 320x576 = 2160 tokens, 4 denoising calls per
# chunk), then bench.json printed. Needs torch with CUDA, peft, safetensors, networkx, rich.
#
#   bash benchmarks/gpu.sh [MODEL] [OUT_DIR]        # defaults: longlive, ${OUT:-bench-gpu}
#
# Extra arguments after OUT_DIR go to benchmarks/bench.py (e.g. --repeats 3). Exits with the harness's
# code: 0 every target of this setting passed, 1 one failed (bench.json is printed either way), 2 bad input.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-longlive}"
DIR="${2:-${OUT:-bench-gpu}}"
shift $(( $# > 2 ? 2 : $# ))
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
status=0
python benchmarks/bench.py "$MODEL" --size 1.3B --device cuda --dtype bfloat16 \
    --tokens 2160 --steps 4 --repeats 5 --profile 25 --report "$DIR" "$@" || status=$?
if [ "$status" -le 1 ]; then cat "$DIR/bench.json"; fi
exit "$status"

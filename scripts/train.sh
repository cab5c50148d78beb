#!/usr/bin/env bash
# The main job: set up what is missing, then a real compressed data-parallel training on 2 local ranks
# (scikit-learn's digits, a small CNN) with mpirun. Override with env: NP, GRADCOMP_COMPRESSOR, ...
#   bash scripts/train.sh                      # topk:ratio=0.01 with error feedback, 2 ranks, 15 epochs, lr 0.1
# (the recipe: at 15 epochs and lr 0.1 top-k at 1% (~50x fewer bytes) matches a dense run of the same
#  settings, docs/benchmarks.md "Recipes"; the last epoch line shows the final accuracy and the ratio)
#   GRADCOMP_COMPRESSOR=randproj:ratio=64 bash scripts/train.sh --epochs 5
set -euo pipefail
cd "$(dirname "$0")/.."
GRADCOMP_SKIP_HOROVOD=${GRADCOMP_SKIP_HOROVOD:-1} bash scripts/setup.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export GRADCOMP_COMPRESSOR=${GRADCOMP_COMPRESSOR:-topk:ratio=0.01}
# Local ranks inherit the whole environment (GRADCOMP_* included); add -x VAR for remote hosts.
# The digits recipe; later arguments win (`bash scripts/train.sh --epochs 5`); --task lm keeps its own defaults.
RECIPE=(--epochs 15 --lr 0.1)
case " $* " in *" --task lm "*|*" --task=lm "*) RECIPE=() ;; esac
exec mpirun -np "${NP:-2}" --oversubscribe python3 examples/torch_train.py "${RECIPE[@]}" "$@"

#!/bin/bash
# Elastic training recipe on one machine: digits with top-k + error feedback while the world grows
# 2 -> 3 -> 4 and shrinks 4 -> 2, then the same training at a fixed 2 ranks for comparison.
#   bash mpi/elastic_recipe.sh [WORKDIR] [pool|horovod]
# pool (default): gradcomp_torch.pool, 4 processes started up front (2 stand by until they join);
#   4 -> 3 by a SIGKILL of one rank at step 75, 3 -> 2 by a graceful leave at step 90. Needs torch.
# horovod: Horovod Elastic (horovodrun --min-np 2 --max-np 4, a discovery file), graceful changes only
#   (a SIGKILLed worker blacklists localhost). Needs Horovod (bash mpi/build_horovod.sh).
# Both need scikit-learn (the digits data).
# Horovod ends the processes of a removed slot with "localhost[N] has been removed from elastic job"
# (exit 134): that is its graceful leave, not a failure. For the latencies (expand / shrink / kill-and-restart) run benchmarks/elastic_bench.py.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
D="${1:-$(mktemp -d /tmp/gradcomp-elastic-XXXX)}"
mkdir -p "$D"
ENGINE="${2:-pool}"
export PYTHONPATH="$ROOT:${PYTHONPATH:-}" OMP_NUM_THREADS=1
if [ "$ENGINE" = pool ]; then
    rm -f "$D/elastic.jsonl" "$D/fixed.jsonl"
    timeout 900 python -m gradcomp_torch.pool --np 2 --max-np 4 --timeout 850 "$ROOT/examples/torch_elastic_pool.py" \
        --schedule 30:3,60:4,90:2 --kill-at 75 --events "$D/elastic.jsonl" 2>&1 | grep -E "^ACC|Traceback|exited" || true
    timeout 900 python -m gradcomp_torch.pool --np 2 --max-np 2 --timeout 850 "$ROOT/examples/torch_elastic_pool.py" \
        --events "$D/fixed.jsonl" 2>&1 | grep -E "^ACC|Traceback" || true
fi
if [ "$ENGINE" = horovod ]; then
echo "localhost:2" > "$D/hosts"
printf '#!/bin/sh\ncat %s\n' "$D/hosts" > "$D/discover.sh"
chmod +x "$D/discover.sh"
# --network-interface lo: without it the elastic driver probes interfaces and, on some machines,
# never starts the workers
timeout 900 horovodrun -np 2 --min-np 2 --max-np 4 --network-interface lo --host-discovery-script "$D/discover.sh" \
    python "$ROOT/examples/torch_elastic.py" --hosts "$D/hosts" --schedule 30:3,60:4,90:2 --events "$D/elastic.jsonl" \
    2>&1 | grep -E "^\[0\]<stdout>:ACC|Traceback" || true
echo "localhost:2" > "$D/hosts"
timeout 900 horovodrun -np 2 --min-np 2 --max-np 2 --network-interface lo --host-discovery-script "$D/discover.sh" \
    python "$ROOT/examples/torch_elastic.py" --events "$D/fixed.jsonl" 2>&1 | grep -E "^\[0\]<stdout>:ACC|Traceback" || true
fi
python - "$D" <<'PY'
import json, sys
for name in ("elastic", "fixed"):
    ev = [json.loads(l) for l in open(f"{sys.argv[1]}/{name}.jsonl")]
    sizes = [e["size"] for e in sorted(ev, key=lambda e: e["t"]) if e["event"] == "first_step" and e["rank"] == 0]
    done = [e for e in ev if e["event"] == "done"][0]
    print(f"{name}: worlds {' -> '.join(map(str, sizes))}, steps {done['step']}, accuracy {done['acc']:.2f}%")
PY

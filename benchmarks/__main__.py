"""The one command of the lab: `python -m benchmarks <kernels|cluster|accuracy|traffic|all> [--smoke] [--out DIR]`.

Each sub-command prints a table, writes `<out>/<name>.csv` and PNG plots, and shows progress.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def _common(p):
    p.add_argument("--smoke", action="store_true", help="seconds-long version (tiny shapes and steps), for CI")
    p.add_argument("--out", default="bench_out", help="output folder for CSV and PNG (default: bench_out)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels", help="compressors vs baselines on real models' gradient shapes")
    _common(k)
    k.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    k.add_argument("--models", default="", help="comma list of resnet18,resnet50,lstm (default: all three)")
    k.add_argument("--reps", type=int, default=0, help="timed steps per method (default 3; smoke 1)")
    k.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    from benchmarks import lab_accuracy, lab_cluster
    c = sub.add_parser("cluster", help="emulated cluster: step time, throughput, scaling over tc-shaped TCP")
    _common(c)
    lab_cluster.add_args(c)
    a = sub.add_parser("accuracy", help="accuracy / perplexity against bytes sent and wall time")
    _common(a)
    lab_accuracy.add_args(a)
    from benchmarks import traffic_model
    t = sub.add_parser("traffic", help="per-rank traffic and time per step at P = 8..256 from measured payloads")
    _common(t)
    traffic_model.add_args(t)
    al = sub.add_parser("all", help="kernels, cluster and accuracy one after the other")
    _common(al)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM becomes SystemExit, so that every `finally` / context manager runs: the network lab is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(args.out, exist_ok=True)
    cmds = ["kernels", "cluster", "accuracy"] if args.cmd == "all" else [args.cmd]
    for cmd in cmds:
        sub_args = args if args.cmd != "all" else parser().parse_args(
            [cmd, "--out", args.out] + (["--smoke"] if args.smoke else []) + (["--quiet"] if args.quiet else []))
        t0 = time.time()
        if cmd == "kernels":
            from benchmarks import lab_kernels as lab
        elif cmd == "cluster":
            from benchmarks import lab_cluster as lab
        elif cmd == "traffic":
            from benchmarks import traffic_model as lab
        else:
            from benchmarks import lab_accuracy as lab
        lab.run(sub_args)
        print(f"\n[{cmd}] done in {time.time() - t0:.1f}s; outputs in {os.path.abspath(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

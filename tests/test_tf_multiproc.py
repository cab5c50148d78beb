"""gradcomp_tf under `mpirun -np 2` (scripts in tests/mpi_scripts/tf_*): real MPI ranks, real model.fit.

- tf_checks.py: `none` equals plain averaged SGD; DistributedGradientTape inside tf.function equals
  eager; a configuration mismatch raises on both ranks; checkpoint-resume is bit-identical; broadcast.
- tf_train_compressors.py: the digits CNN of examples/tf_keras_train.py trained with every registered
  compressor in one launch, each within 2 points of dense accuracy in the same epochs (exceptions
  below, with the reason).
- the two examples themselves, one short launch each.
Every launch has a timeout and its process group is killed on expiry, so a dead rank never hangs.
TF takes tens of seconds to start on a loaded machine: checks are batched into few launches.
"""
import json
import os
import shutil
import sys

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
pytest.importorskip("mpi4py")

import gradcomp  # noqa: E402

pytestmark = [pytest.mark.tf, pytest.mark.mpi]
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "mpi_scripts")
ROOT = os.path.dirname(HERE)
from gradcomp.comm.launch import JobTimeout, load_factor, run_job  # noqa: E402

LOAD = load_factor()                     # measured once: every limit below is scaled by it
TIMEOUT = float(os.environ.get("GRADCOMP_MPI_TEST_TIMEOUT", "900")) * LOAD

# One run per registered compressor, all with the example's defaults (SGD lr 0.05, momentum 0.9, batch 32
# per rank, 4 epochs, seed 0), compared with `none` under the same settings. Spec choices: ratios that
# suit a 38k-parameter CNN in 4 epochs (topk 10%, powersgd rank 4); signsgd's voted step scaled to a
# typical gradient magnitude; signum brings its own momentum (the sign of momentum), so SGD's momentum is
# off for it as in its paper (dgc takes a wrapped SGD's momentum over itself: gradcomp/momentum.py).
SPECS = {
    "topk": "topk:ratio=0.1",
    "powersgd": "powersgd:rank=4",
    "signsgd": "signsgd:scale=0.003",
    "signum": "signum:scale=0.03;--momentum=0",
    "scalecom": "scalecom:ratio=0.25",     # at 0.1: 93.9% / 92.2% in 4 epochs (dense 95.8%): the union
    "gtopk": "gtopk:ratio=0.25",           # is k, ~1.7x fewer coordinates per step than topk's
}
# Exceptions: they train (accuracy floor asserted) but not to dense -2 points in 4 epochs. Measured
# on this CNN (2 ranks, 4 epochs; dense 95.8%; same runs with SGD momentum 0.9 in parentheses):
#   randomk:ratio=0.25 76.6% (57.9), rbgs:ratio=0.25 78.8% (72.7), randproj:ratio=8 72.1% (40.1):
#     each step moves only a random quarter of the coordinates (randomk, rbgs: a random contiguous
#     block) or an 8x smaller random subspace (randproj); error feedback delays the rest, so in 4
#     epochs the model sees ~4-8x fewer effective updates per coordinate than dense SGD.
#   sketch:ratio=4 80.2% (70.5): k = n/8 coordinates per step chosen from a count sketch of n/12
#     buckets per row, the rest delayed by error feedback;
#   efsignsgd 82.2% (66.9), onebit 85.0% (79.7): one bit per entry with a single per-tensor scale;
#     error feedback repays the quantization error only over many steps (Karimireddy et al. 2019 and
#     Seide et al. 2014 train for tens of epochs).
#   dgc:ratio=0.1,warmup_steps=0 92.8% with SGD momentum 0.9 taken over by DGC's momentum correction
#     (the same with momentum 0 and DGC's own 0.9): momentum factor masking zeroes the momentum of every
#     coordinate sent, so with a 10% density each coordinate keeps its momentum only a few steps; its
#     default 1000-step warm-up (densities 25% -> 10%) is longer than these 112 steps and masks more
#     (59.9%), hence warmup_steps=0 here (the README's recipe for runs of a few hundred steps).
#   aggtopk:ratio=0.25 90.3% (0.1: 81.1%, 0.5: 91.4%, with momentum): whole 256-entry chunks chosen
#     by their summed energy, a coarser selection than element-wise top-k on these small tensors.
#   terngrad: unbiased but high-variance ternary steps, so one seed's result depends on the draws: seeds
#     0-4 with the default stream (rng=native) 92.2 / 96.1 / 95.8 / 92.5 / 94.2 (mean 94.2), with
#     rng=counter 93.9 / 97.2 / 96.9 / 93.0 / 86.9 (mean 93.6), dense 95.8 / 97.5 / 96.7 / 96.4 / 95.0
#     (mean 96.3): within 2 points of dense on average, not on every seed.
# With SGD momentum off they do better (error feedback already acts like momentum), so they run so.
EXCEPTIONS = {
    "aggtopk": ("aggtopk:ratio=0.25", 80.0),
    "terngrad": ("terngrad", 88.0),
    "dgc": ("dgc:ratio=0.1,warmup_steps=0", 85.0),
    "randomk": ("randomk:ratio=0.25;--momentum=0", 60.0),
    "rbgs": ("rbgs:ratio=0.25;--momentum=0", 60.0),
    "randproj": ("randproj:ratio=8;--momentum=0", 60.0),
    "efsignsgd": ("efsignsgd;--momentum=0", 60.0),
    "onebit": ("onebit;--momentum=0", 60.0),
    "sketch": ("sketch:ratio=4;--momentum=0", 60.0),
}


def _mpirun():
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.skip("mpirun not found (apt-get install openmpi-bin)")
    return [exe, "--oversubscribe", "--allow-run-as-root", "-np", "2"]


def launch(argv, timeout=TIMEOUT):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    env.pop("GRADCOMP_COMPRESSOR", None)
    cmd = _mpirun() + [sys.executable, *argv]
    try:
        r = run_job(cmd, timeout, cwd=ROOT, env=env, retries=0, scale=False, label=" ".join(argv))
    except JobTimeout as e:
        pytest.fail(str(e))
    return r.returncode, r.output


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    rc, out = launch([os.path.join(SCRIPTS, "tf_checks.py"), str(tmp_path_factory.mktemp("tfck"))])
    lines = [ln.split(maxsplit=4) for ln in out.splitlines() if ln.startswith("CHECK ")]
    res = {}
    for _, name, rank, verdict, *detail in lines:
        res.setdefault(name, {})[int(rank)] = (verdict, detail[0] if detail else "")
    assert rc == 0 and "DONE" in out, out[-4000:]
    return res


@pytest.mark.timeout(1000 * LOAD)
@pytest.mark.parametrize("name", ["sgd", "tape", "mismatch", "resume", "broadcast"])
def test_checks_pass_on_both_ranks(checks, name):
    assert set(checks.get(name, {})) == {0, 1}, f"{name}: not reported by both ranks: {checks.get(name)}"
    for rank, (verdict, detail) in checks[name].items():
        assert verdict == "PASS", f"{name} rank {rank}: {detail}"


@pytest.mark.slow
@pytest.mark.timeout(2400 * LOAD)
def test_every_compressor_trains_digits_within_two_points_of_dense():
    names = gradcomp.available()
    token = {n: EXCEPTIONS[n][0] if n in EXCEPTIONS else SPECS.get(n, n) for n in names}
    rc, out = launch([os.path.join(SCRIPTS, "tf_train_compressors.py"), "--epochs", "4", *token.values()],
                     timeout=2300 * LOAD)
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("ACC ")]
    acc = {r[1]: float(r[2]) for r in rows}
    assert rc == 0 and "DONE" in out and set(acc) == set(token.values()), out[-4000:]
    dense = acc["none"]
    assert dense > 90.0, f"dense accuracy {dense:.2f}% is too low for a meaningful comparison"
    table = "\n".join(" ".join(r) for r in rows)
    for n in names:
        a = acc[token[n]]
        if n in EXCEPTIONS:
            assert a >= EXCEPTIONS[n][1], f"{token[n]}: {a:.2f}% is below its floor {EXCEPTIONS[n][1]}%\n{table}"
        else:
            assert a >= dense - 2.0, f"{token[n]}: {a:.2f}% vs dense {dense:.2f}% (-2 allowed)\n{table}"


@pytest.mark.timeout(700 * LOAD)
@pytest.mark.parametrize("script", ["tf_keras_train.py", "tf_custom_loop.py"])
def test_example_runs_on_two_ranks(script):
    rc, out = launch([os.path.join(ROOT, "examples", script), "--epochs", "1", "--compressor", "topk:ratio=0.05",
                      "--no-progress", "--json"], timeout=600 * LOAD)
    res = [json.loads(ln[len("RESULT "):]) for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert rc == 0 and len(res) == 1, out[-4000:]
    r = res[0]
    assert r["size"] == 2 and r["ratio"] > 5 and r["acc"] > 30, r
    assert "sent" in out and "ratio" in out

"""A Horovod script runs with gradcomp by changing its import (issue 16): Horovod's
pytorch_synthetic_benchmark shape (tests/mpi_scripts/hvd_synthetic.py) under mpirun -np 2, with
Compression.fp16 in the default mode, and with Compression.none under GRADCOMP_COMPRESSOR=topk and
GRADCOMP_SYNC=localsgd (the environment picks the mode; finalize() makes the ranks equal although the run does not end on a sync step). In the default mode the final parameters must be
bit-identical to the same script run on Horovod itself (when horovod.torch is built). Each launch has
an outer timeout."""
import importlib.util
import os
import shutil
import sys

import pytest

pytest.importorskip("torch")

from gradcomp.comm.launch import JobTimeout, load_factor, run_job  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.mpi]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = float(os.environ.get("GRADCOMP_MPI_TEST_TIMEOUT", "600")) * load_factor()


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("sync,compressor", [("", ""), ("localsgd:period=4", "topk:ratio=0.1")],
                         ids=["allreduce-fp16", "localsgd-topk"])
def test_horovod_synthetic_benchmark_with_changed_import(sync, compressor):
    exe = shutil.which("mpirun")
    if exe is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("needs mpirun and mpi4py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OMPI_MCA_rmaps_base_oversubscribe="1", GRADCOMP_BACKEND="",
               GRADCOMP_COMPRESSOR=compressor, GRADCOMP_MEMORY="", GRADCOMP_SYNC=sync)
    cmd = [exe, "--oversubscribe", "--allow-run-as-root", "-np", "2", "-x", "GRADCOMP_SYNC", "-x", "HVD_REAL",
           "-x", "GRADCOMP_COMPRESSOR", sys.executable, os.path.join(HERE, "mpi_scripts", "hvd_synthetic.py")]
    if not compressor:
        cmd.append("--fp16-allreduce")      # else Compression.none: GRADCOMP_COMPRESSOR decides

    def launch(real):
        try:
            r = run_job(cmd, TIMEOUT, cwd=ROOT, env=dict(env, HVD_REAL=real), retries=0, scale=False,
                        label="mpirun hvd_synthetic.py")
        except JobTimeout as e:
            pytest.fail(f"{e} (killed)")
        assert r.returncode == 0, r.output[-3000:]
        return r

    r = launch("")
    if not sync and importlib.util.find_spec("horovod") is not None and importlib.util.find_spec("horovod.torch"):
        ours = [ln for ln in r.output.splitlines() if ln.startswith("PARAMS")]
        theirs = [ln for ln in launch("1").output.splitlines() if ln.startswith("PARAMS")]
        assert ours and ours == theirs, (ours, theirs)      # bit-identical to Horovod's own fp16 run
    assert "Total img/sec on 2 CPU(s)" in r.output, r.output[-3000:]
    checks = [ln for ln in r.output.splitlines() if ln.startswith("CHECK ")]
    assert len(checks) == 5 and all(" PASS" in ln for ln in checks), "\n".join(checks) or r.output[-3000:]


@pytest.mark.tf
@pytest.mark.timeout(TIMEOUT + 60)
def test_horovod_tf2_examples_with_changed_import():
    """Horovod's tensorflow2_mnist (tape in tf.function, fp16) and tensorflow2_keras_mnist (fit with
    BroadcastGlobalVariables, MetricAverage, LearningRateWarmup) shapes under mpirun -np 2."""
    pytest.importorskip("tensorflow")
    exe = shutil.which("mpirun")
    if exe is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("needs mpirun and mpi4py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OMPI_MCA_rmaps_base_oversubscribe="1", GRADCOMP_BACKEND="",
               GRADCOMP_COMPRESSOR="", GRADCOMP_MEMORY="", GRADCOMP_SYNC="", TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [exe, "--oversubscribe", "--allow-run-as-root", "-np", "2", "-x", "TF_CPP_MIN_LOG_LEVEL", sys.executable,
           os.path.join(HERE, "mpi_scripts", "hvd_tf_shapes.py")]
    try:
        r = run_job(cmd, TIMEOUT, cwd=ROOT, env=env, retries=0, scale=False, label="mpirun hvd_tf_shapes.py")
    except JobTimeout as e:
        pytest.fail(f"{e} (killed)")
    assert r.returncode == 0, r.output[-3000:]
    checks = [ln for ln in r.output.splitlines() if ln.startswith("CHECK ")]
    assert len(checks) == 5 and all(" PASS" in ln for ln in checks), "\n".join(checks) or r.output[-3000:]


# Horovod's example scripts (tests/mpi_scripts/examples/, only the import changed), every mode in one
# launch (tests/mpi_scripts/hvd_examples.py). The cheap torch cells run by default; the TF cells and the
# extra launchers are marked slow (TF start-up dominates: minutes on a loaded 2-core machine).
MODES = ["none", "topk", "powersgd", "localsgd"]
CELLS = [
    ("pytorch_mnist", "mpirun", []),
    ("ddp_comm_hook", "torchrun", []),
    ("pytorch_imagenet_resnet50", "horovodrun", [pytest.mark.slow]),
    ("pytorch_mnist", "torchrun", [pytest.mark.slow]),
    ("pytorch_imagenet_resnet50", "mpirun", [pytest.mark.slow]),
    ("pytorch_imagenet_resnet50", "torchrun", [pytest.mark.slow]),
    ("pytorch_mnist", "horovodrun", [pytest.mark.slow]),
    ("pytorch_mnist_elastic", "horovodrun-elastic", []),
    ("pytorch_synthetic_benchmark", "mpirun", []),
    ("pytorch_synthetic_benchmark", "horovodrun", [pytest.mark.slow]),
    ("pytorch_synthetic_benchmark", "torchrun", [pytest.mark.slow]),
    ("tensorflow2_mnist", "mpirun", [pytest.mark.slow, pytest.mark.tf]),
    ("tensorflow2_keras_mnist", "mpirun", [pytest.mark.slow, pytest.mark.tf]),
]


def _launch_cmd(launcher, script_args):
    if launcher == "mpirun":
        exe = shutil.which("mpirun")
        if exe is None or importlib.util.find_spec("mpi4py") is None:
            pytest.skip("needs mpirun and mpi4py")
        return [exe, "--oversubscribe", "--allow-run-as-root", "-np", "2", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
                "-x", "TF_CPP_MIN_LOG_LEVEL", sys.executable] + script_args
    if launcher.startswith("horovodrun"):
        exe = shutil.which("horovodrun")
        if exe is None or importlib.util.find_spec("horovod") is None or importlib.util.find_spec("horovod.torch") is None:
            pytest.skip("needs horovodrun and horovod.torch (bash mpi/build_horovod.sh)")
        if launcher == "horovodrun-elastic":          # Horovod Elastic: host discovery, 1..2 workers
            import tempfile
            disc = os.path.join(tempfile.mkdtemp(prefix="gc-hvd-elastic-"), "discover.sh")
            with open(disc, "w") as f:
                f.write("#!/bin/sh\necho localhost:2\n")
            os.chmod(disc, 0o755)
            return [exe, "-np", "2", "--min-np", "1", "--max-np", "2", "--network-interface", "lo",
                    "--host-discovery-script", disc, sys.executable] + script_args
        return [exe, "-np", "2", sys.executable] + script_args
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)] + script_args


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("example,launcher", [pytest.param(e, la, marks=m, id=f"{e}-{la}") for e, la, m in CELLS])
def test_horovod_example_runs_every_mode_with_changed_import(example, launcher):
    """Each mode: the compressor / policy the environment asks for is the one running, the ranks end
    with equal parameters, bytes were sent; where the script cannot run the mode (a periodic policy in
    DistributedGradientTape or a DDP hook) every rank stops with the clear error (`refused`)."""
    if example.startswith("tensorflow"):
        pytest.importorskip("tensorflow")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OMPI_MCA_rmaps_base_oversubscribe="1", GRADCOMP_BACKEND="",
               GRADCOMP_COMPRESSOR="", GRADCOMP_MEMORY="", GRADCOMP_SYNC="", TF_CPP_MIN_LOG_LEVEL="2",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = _launch_cmd(launcher, [os.path.join(HERE, "mpi_scripts", "hvd_examples.py"), example] + MODES)
    try:
        r = run_job(cmd, TIMEOUT, cwd=ROOT, env=env, retries=0, scale=False, label=f"{launcher} {example}")
    except JobTimeout as e:
        pytest.fail(f"{e} (killed)")
    assert r.returncode == 0, r.output[-3000:]
    import re
    text = re.sub(r"\[\d+(?:,\d+)?\]<std\w+>:", "\n", r.output)    # mpirun [1,0]<stdout>:, elastic [0]<stdout>:
    checks = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("CHECK ")]
    assert f"DONE {example} {' '.join(MODES)}" in text, text[-3000:]
    bad = [ln for ln in checks if " PASS" not in ln]
    assert checks and not bad, "\n".join(bad or checks)
    for mode in MODES:
        assert any(ln.startswith(f"CHECK {example}[{mode}]") for ln in checks), (mode, checks)

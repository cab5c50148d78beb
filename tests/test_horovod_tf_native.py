"""gradcomp_tf.Compression objects inside Horovod's own TensorFlow DistributedGradientTape and
DistributedOptimizer (issue 16), under horovodrun -np 2, in the venv that mpi/build_horovod_tf.sh
builds (Horovod 0.28.1 + TensorFlow 2.19.1; the main environment's TF 2.21 has no Horovod build).
Skipped when that venv is absent (GRADCOMP_HVD_TF_VENV names another one). One launch, an outer
timeout; the checks are in tests/mpi_scripts/hvd_tf_native.py."""
import os
import re
import subprocess

import pytest

from gradcomp.comm.launch import load_factor

pytestmark = [pytest.mark.tf, pytest.mark.horovod, pytest.mark.mpi]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.environ.get("GRADCOMP_HVD_TF_VENV", "/work/venvs/hvd-tf")
TIMEOUT = float(os.environ.get("GRADCOMP_MPI_TEST_TIMEOUT", "600")) * load_factor()


@pytest.mark.timeout(TIMEOUT + 60)
def test_gradcomp_tf_compression_inside_horovods_own_tf_optimizer_and_tape():
    py, hvdrun = os.path.join(VENV, "bin", "python"), os.path.join(VENV, "bin", "horovodrun")
    if not (os.path.exists(py) and os.path.exists(hvdrun)):
        pytest.skip(f"no Horovod-TF venv at {VENV} (build it: bash mpi/build_horovod_tf.sh)")
    probe = subprocess.run([py, "-c", "import horovod.tensorflow"], capture_output=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"horovod.tensorflow does not import in {VENV}: {probe.stderr.decode()[-300:]}")
    env = dict(os.environ, PYTHONPATH=ROOT, PATH=os.path.join(VENV, "bin") + os.pathsep + os.environ["PATH"],
               OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2", GRADCOMP_BACKEND="", GRADCOMP_COMPRESSOR="",
               GRADCOMP_MEMORY="", GRADCOMP_SYNC="", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    try:
        r = subprocess.run([py, hvdrun, "-np", "2", py, os.path.join(HERE, "mpi_scripts", "hvd_tf_native.py")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"horovodrun hvd_tf_native.py timed out after {TIMEOUT:.0f} s: {str(e.stdout)[-2000:]}")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    text = re.sub(r"\[\d+,\d+\]<std\w+>:", "\n", out)          # horovodrun's per-rank prefixes
    checks = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("CHECK ")]
    names = ["tape_fp16_bit_identical", "tape_fp16_differs_from_fp32", "tape_none_bit_identical",
             "tape_bf16_refused_by_horovod", "optimizer_fp16_bit_identical", "keras_fp16_same_as_horovods",
             "topk_refused"]
    for n in names:
        assert any(ln.startswith(f"CHECK {n} PASS") for ln in checks), (n, "\n".join(checks) or out[-3000:])
    print(*[ln.strip() for ln in text.splitlines() if ln.strip().startswith("INFO ")])


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_horovods_keras_example_on_gradcomp_tf_over_horovods_tf_transport():
    """tensorflow2_keras_mnist (only the import changed) under the venv's horovodrun: gradcomp_tf picks
    Horovod's TF collectives as its transport (gradcomp_tf/horovod_comm.py), in modes none/topk/localsgd."""
    py, hvdrun = os.path.join(VENV, "bin", "python"), os.path.join(VENV, "bin", "horovodrun")
    if not (os.path.exists(py) and os.path.exists(hvdrun)):
        pytest.skip(f"no Horovod-TF venv at {VENV} (build it: bash mpi/build_horovod_tf.sh)")
    env = dict(os.environ, PYTHONPATH=ROOT, PATH=os.path.join(VENV, "bin") + os.pathsep + os.environ["PATH"],
               OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2", GRADCOMP_BACKEND="", GRADCOMP_COMPRESSOR="",
               GRADCOMP_MEMORY="", GRADCOMP_SYNC="", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [py, hvdrun, "-np", "2", py, os.path.join(HERE, "mpi_scripts", "hvd_examples.py"), "tensorflow2_keras_mnist",
           "none", "topk", "localsgd"]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"horovodrun hvd_examples.py timed out after {TIMEOUT:.0f} s: {str(e.stdout)[-2000:]}")
    text = re.sub(r"\[\d+,\d+\]<std\w+>:", "\n", r.stdout + r.stderr)
    assert r.returncode == 0, text[-3000:]
    checks = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("CHECK ")]
    assert len(checks) == 9 and all(" PASS" in ln for ln in checks), "\n".join(checks) or text[-3000:]
    assert "TRANSPORT horovod-tf" in text, text[-2000:]

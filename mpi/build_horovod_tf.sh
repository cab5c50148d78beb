#!/usr/bin/env bash
# Horovod 0.28.1 with its TensorFlow side, in a virtual environment of its own (one command):
#
#   bash mpi/build_horovod_tf.sh                   # venv at /work/venvs/hvd-tf, tensorflow-cpu 2.19.1
#   VENV=~/venvs/hvd-tf TF_VERSION=2.19.1 JOBS=2 bash mpi/build_horovod_tf.sh
#   FORCE=1 bash mpi/build_horovod_tf.sh           # rebuild Horovod in an existing venv
#
# Why a venv of its own: the main environment has TensorFlow 2.21, and Horovod 0.28.1 does not build
# against it (see README, "Horovod's TensorFlow side"); a separate venv keeps the main environment's
# packages untouched. The Horovod build itself is mpi/build_horovod.sh with FRAMEWORK=tensorflow
# (same C++17 compiler wrapper and CMake choice). gradcomp is not installed into the venv: run it with
# PYTHONPATH pointing at the source tree (tests/test_horovod_tf_native.py does).
set -euo pipefail

VENV="${VENV:-/work/venvs/hvd-tf}"
TF_VERSION="${TF_VERSION:-2.19.1}"
BASE_PYTHON="${BASE_PYTHON:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
say() { echo "[build_horovod_tf] $*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV with $("$BASE_PYTHON" --version)"
    mkdir -p "$(dirname "$VENV")"
    "$BASE_PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import tensorflow as tf, sys; sys.exit(tf.__version__ != '$TF_VERSION')" >/dev/null 2>&1; then
    say "installing tensorflow-cpu==$TF_VERSION (+ numpy, mpi4py, pytest) into $VENV"
    "$PY" -m pip install -q "tensorflow-cpu==$TF_VERSION"
fi
"$PY" -m pip install -q mpi4py pytest
say "TensorFlow $("$PY" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null | tail -1), Keras $("$PY" -c 'import keras; print(keras.__version__)' 2>/dev/null | tail -1)"
FRAMEWORK=tensorflow PYTHON="$PY" JOBS="${JOBS:-2}" bash "$HERE/build_horovod.sh"

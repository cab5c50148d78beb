#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch + MPI + Gloo, no TF/MXNet) against the installed torch.
#
#   bash mpi/build_horovod.sh            # skips if `import horovod.torch` already works
#   FORCE=1 bash mpi/build_horovod.sh    # rebuild anyway
#   JOBS=4 PYTHON=python3 bash mpi/build_horovod.sh
#   FRAMEWORK=tensorflow PYTHON=/path/venv/bin/python bash mpi/build_horovod.sh
#                                        # TensorFlow + MPI instead (mpi/build_horovod_tf.sh wraps this
#                                        # with a venv of its own; GLOO=1 adds Gloo there too)
#
# Why a script: Horovod 0.28.1 compiles with -std=c++14, but torch>=2.1 headers need C++17. We put a
# tiny compiler wrapper first (it rewrites -std=c++14/-std=gnu++14 to -std=c++17) and point CXX at it.
# Horovod's CMakeLists says cmake_minimum_required(3.13); CMake >= 4 refuses that unless
# CMAKE_POLICY_VERSION_MINIMUM=3.5 is set, so we prefer the system CMake (Debian 12: 3.25).
# Needs: Open MPI (mpicxx, mpirun), CMake >= 3.13, g++, torch. As root with apt-get, missing system
# packages are installed (openmpi-bin libopenmpi-dev cmake g++); otherwise the script says what to install.
set -euo pipefail

PYTHON="${PYTHON:-python}"
HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
FRAMEWORK="${FRAMEWORK:-torch}"
case "$FRAMEWORK" in
    torch) HVD_MODULE=horovod.torch; FW_MODULE=torch; FW_HINT="pip install 'gradcomp[torch]'" ;;
    tensorflow) HVD_MODULE=horovod.tensorflow; FW_MODULE=tensorflow; FW_HINT="bash mpi/build_horovod_tf.sh" ;;
    *) echo "[build_horovod] FRAMEWORK must be torch or tensorflow, got '$FRAMEWORK'" >&2; exit 2 ;;
esac
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

say() { echo "[build_horovod] $*"; }

if [[ "${FORCE:-0}" != "1" ]] && "$PYTHON" -c "import $HVD_MODULE" >/dev/null 2>&1; then
    say "$HVD_MODULE already imports ($("$PYTHON" -c 'import horovod; print(horovod.__version__)')); nothing to do (FORCE=1 rebuilds)."
    exit 0
fi

# --- system prerequisites ------------------------------------------------------------------------
missing=()
command -v mpicxx >/dev/null 2>&1 || missing+=(libopenmpi-dev)
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
if (( ${#missing[@]} )); then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing system packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev cmake g++
    else
        say "missing: ${missing[*]}. Install them first, e.g.:"
        say "  sudo apt-get install openmpi-bin libopenmpi-dev cmake g++"
        exit 1
    fi
fi

if ! "$PYTHON" -c "import $FW_MODULE" >/dev/null 2>&1; then
    say "$FW_MODULE is not importable with $PYTHON; install it first: $FW_HINT"
    exit 1
fi
FW_VERSION="$("$PYTHON" -c "import $FW_MODULE; print($FW_MODULE.__version__)" 2>/dev/null | tail -1)"
say "building Horovod $HOROVOD_VERSION for $FW_MODULE $FW_VERSION with $JOBS parallel jobs"

# --- CMake: prefer one < 4 (Horovod's policy minimum is 3.13) ------------------------------------
cmake_major() { "$1" --version | sed -n 's/^cmake version \([0-9]*\)\..*/\1/p'; }
CMAKE_BIN="$(command -v cmake)"
for cand in /usr/bin/cmake /usr/local/bin/cmake "$CMAKE_BIN"; do
    if [[ -x "$cand" ]] && [[ "$(cmake_major "$cand")" == "3" ]]; then CMAKE_BIN="$cand"; break; fi
done
if [[ "$(cmake_major "$CMAKE_BIN")" != "3" ]]; then
    say "only CMake $("$CMAKE_BIN" --version | head -1) found; setting CMAKE_POLICY_VERSION_MINIMUM=3.5"
    export CMAKE_POLICY_VERSION_MINIMUM=3.5
fi
export HOROVOD_CMAKE="$CMAKE_BIN"
say "using $("$CMAKE_BIN" --version | head -1) at $CMAKE_BIN"

# --- C++17 compiler wrapper ----------------------------------------------------------------------
WRAP_DIR="$(mktemp -d -t gradcomp-hvd-cxx.XXXXXX)"
trap 'rm -rf "$WRAP_DIR"' EXIT
REAL_CXX="$(command -v "${CXX:-g++}")"
cat >"$WRAP_DIR/cxx17" <<EOF
#!/usr/bin/env bash
# Forward to $REAL_CXX, upgrading Horovod's C++14 flag to the C++17 that torch/TF headers need.
# horovod/tensorflow/xla_mpi_ops.cc holds only GPU code (all of it inside #if HAVE_GPU) but includes
# TF's XLA headers first; in TF 2.19 those include LLVM headers the TF wheel does not ship
# (llvm/ADT/ArrayRef.h). In a build without HAVE_GPU its TENSORFLOW_VERSION is set to 0 for that one
# file, so its version guard skips the includes too: it compiles to the same empty object.
args=()
xla_cpu=0
case " \$* " in *xla_mpi_ops.cc*) case " \$* " in *-DHAVE_GPU=1*) ;; *) xla_cpu=1 ;; esac ;; esac
for a in "\$@"; do
    case "\$a" in
        -std=c++14|-std=gnu++14|-std=c++11|-std=gnu++11) args+=("-std=c++17") ;;
        -DTENSORFLOW_VERSION=*) if [[ \$xla_cpu == 1 ]]; then args+=("-DTENSORFLOW_VERSION=0"); else args+=("\$a"); fi ;;
        *) args+=("\$a") ;;
    esac
done
exec "$REAL_CXX" "\${args[@]}"
EOF
chmod +x "$WRAP_DIR/cxx17"
export CXX="$WRAP_DIR/cxx17"
say "CXX=$CXX -> $REAL_CXX"

# --- build + install -----------------------------------------------------------------------------
"$PYTHON" -m pip install -q "setuptools>=68" wheel packaging cloudpickle psutil pyyaml
export MAKEFLAGS="-j$JOBS"
export HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_MPI=1
if [[ "$FRAMEWORK" == "torch" ]]; then
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITH_GLOO=1
else
    export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1
    if [[ "${GLOO:-0}" == "1" ]]; then export HOROVOD_WITH_GLOO=1; else export HOROVOD_WITHOUT_GLOO=1; fi
fi
start=$(date +%s)
"$PYTHON" -m pip install --no-build-isolation --no-cache-dir -v "horovod==$HOROVOD_VERSION"
say "pip install finished in $(( $(date +%s) - start )) s"

# --- check ---------------------------------------------------------------------------------------
cd /tmp  # import the installed package, not a source tree
HVD_MODULE="$HVD_MODULE" "$PYTHON" - <<'EOF'
import importlib, os
import horovod
hvd = importlib.import_module(os.environ["HVD_MODULE"])
hvd.init()
print(f"[build_horovod] horovod {horovod.__version__}: mpi_built={hvd.mpi_built()} gloo_built={hvd.gloo_built()} "
      f"size={hvd.size()}")
assert hvd.mpi_built(), "Horovod was built without MPI"
EOF
HVDRUN="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")/horovodrun"
[[ -x "$HVDRUN" ]] || HVDRUN="$(command -v horovodrun || true)"
if [[ -n "$HVDRUN" ]]; then "$PYTHON" "$HVDRUN" --check-build || true; fi
say "done. Try: horovodrun -np 2 $PYTHON -c 'import $HVD_MODULE as hvd; hvd.init(); print(hvd.rank())'"

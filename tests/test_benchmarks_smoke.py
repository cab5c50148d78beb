"""Smoke tests of the benchmark lab: each sub-command's --smoke run, in a subprocess with a timeout.

They check that the one command produces its CSV and PNG and that the table has the expected rows
(every registered compressor and the baselines in `kernels`; the compute-only and dense rows in
`cluster`, which uses network namespaces as root and loopback TCP otherwise; dense SGD beside the
other methods for both tasks in `accuracy`). Timings are never asserted. Plus quick unit checks
of the table/CSV helpers and the method lists. Every timeout here (and the lab's own per-launch
timeout) is scaled by the machine's load (gradcomp.comm.launch.scaled_timeout): a loaded CI machine
gets more time, not a failure.
"""
import csv
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)          # the lab is the repository's benchmarks/ folder, not an installed package
pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from gradcomp.comm.launch import JobTimeout, load_factor, run_job  # noqa: E402

LOAD = load_factor()                             # measured once, so the nested limits stay ordered
LIMIT = pytest.mark.timeout(600 * LOAD)          # pytest-timeout: above each _run's own limit


class _Done:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run(sub, out, timeout, *extra):
    """The sub-command's smoke run, `timeout` seconds on an idle machine (scaled by load; no retry:
    the lab retries its own launches)."""
    cmd = [sys.executable, "-m", "benchmarks", sub, "--smoke", "--quiet", "--out", str(out), *extra]
    try:
        r = run_job(cmd, timeout * LOAD, cwd=REPO, retries=0, scale=False)
    except JobTimeout as e:
        pytest.fail(str(e))
    # the tables go to stdout, progress to stderr; run_job merges them, which is all the checks need
    done = _Done(r.returncode, r.output, r.output)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.output[-6000:]}"
    return done


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _png(path):
    assert os.path.exists(path), f"{path} missing"
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert os.path.getsize(path) > 2000


# ------------------------------------------------------------------------------ fast unit checks
def test_table_and_csv_roundtrip(tmp_path):
    from benchmarks import plotting
    rows = [{"a": "x", "b": 1.23456}, {"a": "longer name", "b": float("nan")}, {"a": "z"}]
    text = plotting.table(rows, ["a", "b"])
    lines = text.splitlines()
    assert len(lines) == 5 and lines[0].startswith("| a")
    assert len({len(line) for line in lines}) == 1, "columns are not aligned"
    assert "1.23" in text and "n/a" in text
    path = plotting.emit(rows, ["a", "b"], str(tmp_path), "t")
    back = _rows(path)
    assert [r["a"] for r in back] == ["x", "longer name", "z"]
    assert back[2]["b"] == ""


def test_kernel_specs_cover_registry():
    import gradcomp
    from benchmarks.lab_kernels import lab_specs, resolve_spec
    specs = lab_specs()
    names = {label.split(":")[0] for label, _, _ in specs}
    assert names == set(gradcomp.available())
    spec, why = resolve_spec("no-such-compressor")
    assert spec is None and "no-such-compressor" in why


def test_cluster_method_list_has_baselines_and_policies():
    from benchmarks.lab_cluster import method_list
    full = method_list(smoke=False)
    labels = [m["label"] for m in full]
    assert labels[0].startswith("dense allreduce")
    assert any("horovod fp16" == lab for lab in labels)
    assert any("da-pipelined" in lab for lab in labels)
    assert any(lab.startswith("gradcomp topk") for lab in labels)
    only = method_list(smoke=False, only="fp16")
    assert only and all("fp16" in m["label"] for m in only)


def test_workload_parameter_counts():
    from benchmarks import workloads
    # torchvision's counts for the ImageNet models: the shapes are the real ones
    assert workloads.num_params(workloads.build("resnet18")) == 11_689_512
    assert workloads.num_params(workloads.build("resnet50")) == 25_557_032
    grads = workloads.model_gradients("lstm", small=True)
    assert grads and all(g.abs().sum() > 0 for g in grads.values() if g.numel() > 1)


# ------------------------------------------------------------------------------ the sub-commands
@LIMIT
def test_kernels_smoke(tmp_path):
    import gradcomp
    r = _run("kernels", tmp_path, 540)
    rows = _rows(tmp_path / "kernels.csv")
    methods = {row["method"] for row in rows}
    for name in gradcomp.available():
        assert any(m.split(":")[0] == name for m in methods), f"no row for compressor {name}"
    for base in ("fp32 copy", "torch.topk", "powersgd-hook"):
        assert any(m.startswith(base) for m in methods), f"no baseline row {base}"
    assert len({row["model"] for row in rows}) == 2
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(ok) >= 0.8 * len(rows), [row for row in rows if row["status"] != "ok"]
    for row in ok:
        assert float(row["total_ms"]) >= 0 and float(row["payload_MB"]) > 0
    fp16 = [row for row in ok if row["method"] == "fp16"]
    assert fp16 and all(abs(float(row["ratio"]) - 2.0) < 1e-6 for row in fp16)
    assert "| device" in r.stdout
    _png(tmp_path / "kernels.png")
    _png(tmp_path / "kernels_error.png")


@pytest.mark.mpi
@LIMIT
def test_cluster_smoke(tmp_path):
    if not shutil.which("mpirun"):
        pytest.skip("Open MPI's mpirun is not installed")
    pytest.importorskip("mpi4py")
    r = _run("cluster", tmp_path, 540, "--timeout", str(int(120 * LOAD)))   # the lab retries a launch once
    rows = _rows(tmp_path / "cluster.csv")
    single = [row for row in rows if row["ranks"] == "1"]
    assert single and single[0]["status"] == "ok" and float(single[0]["step_ms"]) > 0
    multi = [row for row in rows if row["ranks"] == "2"]
    dense = [row for row in multi if row["method"].startswith("dense allreduce")]
    assert dense and dense[0]["status"] == "ok", dense
    assert float(dense[0]["samples_s"]) > 0 and float(dense[0]["efficiency"]) > 0
    assert any(row["method"].startswith("gradcomp") for row in multi)
    assert all(row["status"] for row in multi)
    horovod = [row for row in multi if row["method"].startswith("horovod")]
    assert horovod and all(row["status"] == "ok" or "not available" in row["status"] for row in horovod)
    net = dense[0]["network"]
    assert "loopback" in net or "gbit" in net
    if os.geteuid() == 0 and "loopback" not in net:
        assert "gcsns0" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout, \
            "the smoke lab's namespaces were not removed"
    assert "| model" in r.stdout
    _png(tmp_path / "cluster.png")


@pytest.mark.mpi
@LIMIT
def test_accuracy_smoke(tmp_path):
    if not shutil.which("mpirun"):
        pytest.skip("Open MPI's mpirun is not installed")
    pytest.importorskip("mpi4py")
    pytest.importorskip("sklearn")
    data = os.path.join(REPO, "..", "shared", "data", "wikitext2-valid.txt")
    tasks = "digits,lm" if os.path.exists(data) else "digits"
    _run("accuracy", tmp_path, 540, "--tasks", tasks)
    rows = _rows(tmp_path / "accuracy.csv")
    for task in tasks.split(","):
        mine = [row for row in rows if row["task"] == task]
        dense = [row for row in mine if row["method"].startswith("dense")]
        assert dense and dense[0]["status"] == "ok", dense
        assert len(mine) >= 3, "dense SGD must appear beside the other methods"
        for row in mine:
            if row["status"] == "ok":
                v = float(row["final"])
                assert (0 <= v <= 100) if task == "digits" else v > 1
                assert float(row["MB_sent"]) > 0
        _png(tmp_path / f"accuracy_{task}.png")
    curves = _rows(tmp_path / "accuracy_curves.csv")
    assert curves and {c["task"] for c in curves} == set(tasks.split(","))


@pytest.mark.horovod
@pytest.mark.timeout(400 * LOAD)
def test_torch_vs_horovod_smoke():
    """The head-to-head script runs under mpirun and prints every row; topk 0.01 sends >= 45x fewer
    bytes than Horovod's dense allreduce (bytes are deterministic; times are not asserted)."""
    if not shutil.which("mpirun"):
        pytest.skip("Open MPI's mpirun is not installed")
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        pytest.skip("Horovod is not installed (bash mpi/build_horovod.sh)")
    cmd = [sys.executable, "benchmarks/torch_vs_horovod.py", "--launch", "--model", "small", "--steps", "1",
           "--warmup", "1", "--rounds", "1", "--timeout", str(int(300 * LOAD))]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=360 * LOAD)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    assert {"compute only", "horovod", "gradcomp[horovod] none", "gradcomp[horovod] topk 0.01"} <= set(rows), rows
    assert any(k.startswith("gradcomp[mpi] none") for k in rows), rows
    assert rows["horovod"][2] == "1.000x" and float(rows["gradcomp[horovod] none"][0]) > 0
    assert rows["gradcomp[horovod] none"][3] == rows["horovod"][3]            # same bytes as Horovod
    assert float(rows["gradcomp[horovod] topk 0.01"][4].rstrip("x")) >= 45

"""Compress + decompress of one fused bucket, two source trees against each other (an A/B of the kernels).

    python benchmarks/bucket_kernels_ab.py "qsgd;natural;onebit" /path/to/before /path/to/after

One 6.5M-entry float32 bucket of 40 tensors (about one 25 MiB bucket; heavy-tailed values), compressed
and decoded through Compressor.compress/decompress with a fused-bucket Ctx (segments = the 40 sizes),
each tree's gradcomp imported in turn, 5 interleaved repetitions, the median CPU time of this process
with 1 torch thread (robust to other jobs on a shared machine). Prints one markdown row per spec:
before ms, after ms, speed-up, and one 6.5M clone() for scale. A measurement, not a test.
"""
import sys, time, torch, numpy as np
torch.set_num_threads(1)
specs = sys.argv[1].split(";")
n = 6_500_000
x = torch.from_numpy(np.random.default_rng(0).standard_t(3, n).astype(np.float32) * 1e-3)
segs = tuple([n // 40] * 39 + [n - 39 * (n // 40)])
def load(root, spec):
    for m in [k for k in sys.modules if k == "gradcomp" or k.startswith("gradcomp.")]:
        del sys.modules[m]
    sys.path.insert(0, root)
    import gradcomp
    from gradcomp.compressors.base import Ctx
    from gradcomp.backend import backend_by_name
    sys.path.pop(0)
    comp = gradcomp.create(spec)
    b = backend_by_name("torch")
    def run():
        ctx = Ctx(b, "bucket/x", (n,), "float32", n, 3, 1, 0, 2, segments=segs, members=tuple(str(i) for i in range(40)))
        st = comp.init_state(x, ctx)
        p, info = comp.compress(x, st, ctx)
        comp.decompress(p, info, ctx)
    return run
for spec in specs:
    runs = {"before": load(sys.argv[2], spec), "after": load(sys.argv[3], spec)}
    res = {k: [] for k in runs}
    cp = []
    for rep in range(5):
        for k, f in runs.items():
            t0 = time.process_time(); f(); res[k].append(time.process_time() - t0)
        t0 = time.process_time(); x.clone(); cp.append(time.process_time() - t0)
    med = {k: sorted(v)[2] * 1e3 for k, v in res.items()}
    c = sorted(cp)[2] * 1e3
    print(f"| {spec} | {med['before']:.1f} | {med['after']:.1f} | {med['before'] / med['after']:.2f}x | {c:.1f} |", flush=True)

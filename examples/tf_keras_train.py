"""Data-parallel Keras 3 model.fit with compressed gradients: a CNN on digits or an LSTM language model.

    python examples/tf_keras_train.py                                         # one process
    GRADCOMP_COMPRESSOR=topk:ratio=0.01 mpirun -np 2 python examples/tf_keras_train.py
    mpirun -np 2 python examples/tf_keras_train.py --compressor fp16 --epochs 3
    mpirun -np 2 python examples/tf_keras_train.py --task lm --data ../shared/data/wikitext2-valid.txt

Each rank trains on its own shard of the data (a fresh shared shuffle per epoch); model.fit runs
with gradcomp_tf.DistributedOptimizer (compressor / memory / sync policy from the arguments or the
GRADCOMP_* variables) and gradcomp_tf's callbacks: initial weights broadcast from rank 0, epoch
metrics averaged over ranks, bytes sent and compression ratio per epoch. Rank 0 shows Keras'
progress bar and prints the test accuracy (digits) or perplexity (lm) per epoch.
--checkpoint PREFIX saves a tf.train.Checkpoint per rank after every epoch (PREFIX-rank{r}: the
error-feedback residuals differ per rank); --resume continues from it exactly.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common_data  # noqa: E402


def parse_args(argv=None, description=None):
    p = common_data.training_parser(description or __doc__.split("\n\n")[0], backends="auto | mpi | horovod",
                                    max_vocab=10000, threads_help="TF intra-op threads per rank (0: TF's choice)",
                                    checkpoint_help="checkpoint prefix; every rank writes PREFIX-rank{r}")
    p.add_argument("--mode", choices=("auto", "graph", "island"), default="auto",
                   help="how the exchange runs inside tf.function (see gradcomp_tf/engine.py)")
    p.add_argument("--jit-compile", action="store_true", help="model.compile(jit_compile=True): shows the error")
    return common_data.finish_args(p, argv)


def setup_tf(a):
    import tensorflow as tf
    if a.threads:
        tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    import keras
    keras.utils.set_random_seed(a.seed)          # the same initial weights on every rank
    return tf, keras


def allreduce_sum(comm, values):
    return np.asarray(comm.allreduce(np.asarray(values, dtype=np.float64), name="metrics").wait(), np.float64)


def checksum(model) -> str:
    h = hashlib.sha256()
    for v in model.weights:
        h.update(np.ascontiguousarray(v.numpy()).tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ tasks
class DigitsTask:
    metric = "acc"

    def __init__(self, a, comm, keras):
        self.a, self.comm = a, comm
        xtr, self.ytr, xte, self.yte = common_data.digits(a.seed)
        self.xtr, self.xte = xtr.transpose(0, 2, 3, 1), xte.transpose(0, 2, 3, 1)   # NHWC for Keras
        L = keras.layers
        self.model = keras.Sequential([
            keras.Input((8, 8, 1)), L.Conv2D(16, 3, padding="same", activation="relu"),
            L.Conv2D(32, 3, padding="same", activation="relu"), L.MaxPooling2D(2), L.Flatten(),
            L.Dense(64, activation="relu"), L.Dense(10)])
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make_optimizer(self, keras):
        return keras.optimizers.SGD(self.a.lr, momentum=self.a.momentum)

    def epoch_data(self, epoch):
        """This rank's (x, y) for `epoch`, in batch order."""
        idx = common_data.epoch_shard(len(self.ytr), self.comm.rank, self.comm.size, self.a.seed, epoch)
        return self.xtr[idx], self.ytr[idx]

    def evaluate(self):
        idx = common_data.shard_tokens(np.arange(len(self.yte)), self.comm.rank, self.comm.size)
        if self.comm.rank == self.comm.size - 1:
            idx = np.arange(idx[0] if len(idx) else 0, len(self.yte))
        logits = self.model.predict(self.xte[idx], verbose=0, batch_size=256)
        c, n = allreduce_sum(self.comm, [float((logits.argmax(1) == self.yte[idx]).sum()), len(idx)])
        return 100.0 * c / n


class LMTask:
    metric = "ppl"

    def __init__(self, a, comm, keras):
        self.a, self.comm = a, comm
        corpus = common_data.Corpus(a.data, a.max_vocab)
        train = common_data.shard_tokens(corpus.encode(a.data), comm.rank, comm.size)
        test = common_data.shard_tokens(corpus.encode(a.eval_data), comm.rank, comm.size)
        self.train = self._windows(common_data.batchify(train, a.batch_size))
        self.test = self._windows(common_data.batchify(test, 10))
        L = keras.layers
        self.model = keras.Sequential([
            keras.Input((a.bptt,), dtype="int32"), L.Embedding(len(corpus), a.emsize),
            L.LSTM(a.nhid, return_sequences=True), L.Dense(len(corpus))])
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def _windows(self, rows):
        """(B, T) token rows -> (x, y) of full bptt windows, window-major so one batch = one window."""
        bptt, (b, t) = self.a.bptt, rows.shape
        starts = list(range(0, t - 1 - bptt + 1, bptt))
        if not starts:
            raise ValueError(f"{t} tokens per row are too few for --bptt {bptt}")
        x = np.concatenate([rows[:, i:i + bptt] for i in starts]).astype(np.int32)
        y = np.concatenate([rows[:, i + 1:i + 1 + bptt] for i in starts]).astype(np.int32)
        return x, y

    def make_optimizer(self, keras):
        return keras.optimizers.Adam(self.a.lr, global_clipnorm=self.a.clip)

    def epoch_data(self, epoch):
        return self.train

    def evaluate(self):
        x, y = self.test
        loss = self.model.evaluate(x, y, batch_size=10, verbose=0, return_dict=True)["loss"]
        s, n = allreduce_sum(self.comm, [loss * y.size, y.size])
        return math.exp(s / n)


def build_task(a, comm, keras):
    return (LMTask if a.task == "lm" else DigitsTask)(a, comm, keras)


def report(a, comm, epoch, loss, score, sent, dense, t0, metric):
    ratio = dense / sent if sent else float("nan")
    res = {"epoch": epoch + 1, "loss": loss, metric: score, "bytes_sent": sent, "ratio": ratio,
           "time_s": time.time() - t0}
    if comm.rank == 0:
        shown = f"acc {score:.2f}%" if metric == "acc" else f"ppl {score:.1f}"
        print(f"epoch {epoch + 1}/{a.epochs}  loss {loss:.4f}  {shown}  sent {sent / 1e6:.3f} MB  "
              f"ratio {ratio:.1f}x  {res['time_s']:.1f}s", flush=True)
    return res


# ------------------------------------------------------------------ main loop
def main(argv=None):
    a = parse_args(argv)
    tf, keras = setup_tf(a)
    import gradcomp_tf as gct
    return train(a, gct.init(a.backend), tf, keras)


def train(a, comm, tf, keras):
    import gradcomp_tf as gct
    task = build_task(a, comm, keras)
    model = task.model
    opt = gct.DistributedOptimizer(task.make_optimizer(keras), compressor=a.compressor, memory=a.memory,
                                   sync=a.sync, backend=comm, seed=a.seed, mode=a.mode)
    model.compile(optimizer=opt, loss=task.loss, jit_compile=a.jit_compile)
    opt.build(model.trainable_variables)               # so a checkpoint can restore its slots at once
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt, epoch=epoch_var)   # opt tracks gradcomp_state
    path = gct.rank_path(a.checkpoint, comm) if a.checkpoint else None
    start = 0
    if a.resume and tf.io.gfile.exists(path + ".index"):
        ckpt.read(path).assert_consumed()
        start = int(epoch_var.numpy())
    rank0 = comm.rank == 0
    if rank0:
        print(f"gradcomp_tf: {a.task} on {comm.size} rank(s) via {getattr(comm, 'engine', '?')}; "
              f"{opt.gradcomp_exchange.describe()}", flush=True)

    class OneEpoch(keras.callbacks.Callback):          # one fit() per epoch: fresh shard, eval, checkpoint
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    stats_cb = gct.callbacks.CompressionStatsCallback(verbose=0)
    callbacks = [gct.callbacks.MetricAverageCallback(backend=comm), stats_cb, OneEpoch()]
    if start == 0:      # a resumed rank restores its own state (parameters may differ under local SGD)
        callbacks.insert(0, gct.callbacks.BroadcastGlobalVariablesCallback(0, backend=comm))
    result = {}
    last = a.epochs if a.stop_after is None else min(a.epochs, start + a.stop_after)
    for epoch in range(start, last):
        t0 = time.time()
        x, y = task.epoch_data(epoch)
        hist = model.fit(x, y, batch_size=a.batch_size, epochs=a.epochs, initial_epoch=epoch, shuffle=False,
                         verbose=(1 if not a.no_progress else 2) if rank0 else 0, callbacks=callbacks)
        rec = stats_cb.history[-1]
        result = report(a, comm, epoch, hist.history["loss"][-1], task.evaluate(), rec["bytes_sent"],
                        rec["bytes_dense"], t0, task.metric)
        if path:
            epoch_var.assign(epoch + 1)
            ckpt.write(path)
    result.update(checksum=checksum(model), compressor=opt.gradcomp_exchange.sync.compressor.spec(),
                  size=comm.size, total=opt.gradcomp_stats(), path=list(opt.gradcomp_exchange.path))
    if rank0 and a.json:
        print("RESULT " + json.dumps(result, default=float), flush=True)
    return result


if __name__ == "__main__":
    main()

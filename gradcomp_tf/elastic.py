"""`hvd.elastic` for TensorFlow / Keras: not supported by gradcomp_tf; every name raises a clear error.

Horovod's TF elastic API (run, TensorFlowKerasState, TensorFlowState, CommitStateCallback,
UpdateBatchStateCallback, UpdateEpochStateCallback) would have to flush gradcomp_tf's residuals on a
graceful change, restore them to zero after a failure and rebind the exchange to a new world, as
gradcomp_torch.elastic does for torch; none of that exists for TF (and Horovod's elastic TF needs its TF
build, which only runs in the separate venv of mpi/build_horovod_tf.sh). Rather than let a Horovod
elastic script run with residuals that silently belong to the old world, the names fail on use.
"""
_NAMES = ("run", "TensorFlowKerasState", "TensorFlowState", "KerasState", "ObjectState", "State",
          "CommitStateCallback", "UpdateBatchStateCallback", "UpdateEpochStateCallback")

MESSAGE = ("gradcomp_tf does not support Horovod Elastic (hvd.elastic.{name}): residuals and sync state "
           "are not carried across a change of the worker set in TensorFlow. Use a fixed-size job "
           "(mpirun / horovodrun -np N) that checkpoints with model.save / gradcomp_tf.load_model and restarts; "
           "elastic training is available for PyTorch (gradcomp_torch.elastic, README 'Elastic training').")


def __getattr__(name):
    if name in _NAMES:
        raise NotImplementedError(MESSAGE.format(name=name))
    raise AttributeError(f"module 'gradcomp_tf.elastic' has no attribute {name!r}")

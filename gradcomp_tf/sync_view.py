"""KerasParamView: the ParamAccess (gradcomp/sync/base.py) over Keras variables and optimizer momenta.

Sync policies (local SGD, SlowMo, double averaging) read and overwrite parameters and momentum
buffers by name through this view; it runs eagerly (inside the optimizer's host call when the train
step is a tf.function). "Momentum" is the optimizer's first-moment slot: SGD's `momentums`
(None without momentum), Adam/AdamW/Nadam/RMSprop's `_momentums`.
"""
from __future__ import annotations

import tensorflow as tf

from gradcomp.sync.base import ParamAccess

_MOMENTUM_ATTRS = ("momentums", "_momentums")


class KerasParamView(ParamAccess):
    def __init__(self, optimizer, variables, names):
        if len(variables) != len(names):
            raise ValueError("KerasParamView needs one name per variable")
        self.optimizer = optimizer
        self._vars = dict(zip(names, variables))
        self._names = list(names)

    def names(self):
        return list(self._names)

    def items(self):
        """(name, variable) pairs in the optimizer's order."""
        return [(n, self._vars[n]) for n in self._names]

    def _var(self, name):
        try:
            return self._vars[name]
        except KeyError:
            raise KeyError(f"no parameter {name!r}; known: {', '.join(self._names[:8])}...") from None

    def get(self, name):
        return tf.convert_to_tensor(self._var(name))

    def set(self, name, value):
        v = self._var(name)
        v.assign(tf.reshape(tf.cast(value, v.dtype), v.shape))

    def _slot(self, name):
        opt, var = self.optimizer, self._var(name)
        if not getattr(opt, "built", False):
            return None
        for attr in _MOMENTUM_ATTRS:
            slots = getattr(opt, attr, None)
            if slots:
                try:
                    return slots[opt._get_variable_index(var)]
                except (KeyError, IndexError):
                    return None
        return None

    def momentum(self, name):
        s = self._slot(name)
        return None if s is None else tf.convert_to_tensor(s)

    def learning_rate(self, name):
        try:
            return float(self.optimizer.learning_rate)      # the schedule's value at the current iteration
        except (TypeError, ValueError):
            return None

    def adaptive(self) -> bool:
        import keras
        return not isinstance(self.optimizer, keras.optimizers.SGD)

    def set_momentum(self, name, value):
        s = self._slot(name)
        if s is None:
            raise ValueError(f"optimizer {type(self.optimizer).__name__} keeps no momentum for {name!r}")
        s.assign(tf.reshape(tf.cast(value, s.dtype), s.shape))

"""Examples for madam-optax: Flax NNX models on offline data, the ``madam-demo``
command and the learning-rate study's training loops (arXiv:2006.14560).

Shared modules: ``data`` (loaders), ``models``, ``optimizers`` (by name, with
the zero-leaf recipe), ``step`` (the jittable training step, float weights or
LNS codes), ``loop`` (runs, evaluations, checkpoints), ``tasks`` (data, model,
loss and metric of each family), ``memory`` (byte counts), ``mesh`` (device
meshes and global batches), ``checkpointing``, ``gan_metric``, ``cli``
(argument types and one-line errors of the commands). Scripts on them:
``demo``, ``lns_digits``, ``sharded_train``, ``equinox_mlp``.

Not part of the core library (``madam_optax`` imports no Flax).
"""

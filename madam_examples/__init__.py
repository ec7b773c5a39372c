"""Examples for madam-optax: Flax NNX models on offline data, the ``madam-demo``
command and the learning-rate study's training loops (arXiv:2006.14560).

Shared modules: ``data`` (loaders), ``models``, ``optimizers`` (by name, with
the zero-leaf rule and the Transformer recipe), ``step`` (the jittable training step, float weights or
LNS codes), ``loop`` (runs, evaluations, checkpoints), ``tasks`` (data, model,
loss and metric of each family), ``memory`` (byte counts), ``mesh`` (device
meshes and global batches), ``checkpointing``, ``processes`` (multi-process
start-up, settings compared across processes, barriers with timeouts),
``metrics`` (the sharded run's metrics file),
``lns_layers`` (int8 decoder training one block at a time), ``cli`` (argument
types, output paths proven writable, one-line errors). Scripts on them:
``demo``, ``lns_digits``, ``lns_transformer``, ``sharded_train``,
``equinox_mlp``, ``launch_local``.

Not part of the core library (``madam_optax`` imports no Flax).
"""

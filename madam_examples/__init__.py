"""Examples for madam-optax: Flax NNX models on offline data, the ``madam-demo``
command and the learning-rate study's training loops (arXiv:2006.14560).

Not part of the core library (``madam_optax`` imports no Flax).
"""

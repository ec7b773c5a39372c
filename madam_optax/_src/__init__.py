"""Implementation modules of madam-optax; import from ``madam_optax``."""

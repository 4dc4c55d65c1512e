"""Training for VQFR: the stage-1 codebook VQGAN and the stage-2 restoration networks (v1 and v2).

Separate from inference: nothing in ``vqfr``, ``kernels``, ``export`` or ``deploy`` imports this package.
Entry point: ``python -m training.train --config training/configs/<name>.yml`` (see docs/TRAINING.md).
"""

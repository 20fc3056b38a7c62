"""fastgrad: kernels, optimizers and a pretraining command for memory-efficient LLM training.

Importing fastgrad defines every ``torch.ops.fastgrad`` op (``fastgrad._ops``) and registers the
fastest available implementation for each device (``fastgrad._backends``).
"""

from fastgrad import (
    _backends,
    _ops,  # noqa: F401  (defines the op schemas)
)

_backends.load()

from fastgrad import ops  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]

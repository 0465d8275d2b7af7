"""scaletrain: fast, small LLM training on LibTorch.

The native module ``scaletrain._C`` holds the implementation; this package re-exports it.
"""

import torch  # loads libtorch before the native module


def _check_torch() -> None:
    """The native module links the LibTorch it was built against; another torch would fail with
    undefined symbols or crash, so say which two differ before loading it."""
    try:
        from scaletrain._build import TORCH_VERSION
    except ImportError:  # a source tree that was never built: _C's import below says so
        return
    if torch.__version__ != TORCH_VERSION:
        raise ImportError(f"scaletrain was built against torch {TORCH_VERSION}, but this environment has torch "
                          f"{torch.__version__}: install torch=={TORCH_VERSION.split('+')[0]} (the same build), or "
                          f"rebuild scaletrain against this torch (pip install --no-build-isolation .)")


_check_torch()

from scaletrain import _C, accum, amp, attention, nn, optim  # noqa: E402
from scaletrain._C import (
    ConfigError,
    InputError,
    build_info,
    check_program,
    config_reference,
    config_yaml,
    corpus_bleu4,
    dsl_split,
    load_config,
    mean_rouge_l,
    rouge_l,
)

__version__ = _C.version()

__all__ = [
    "ConfigError",
    "accum",
    "amp",
    "attention",
    "optim",
    "InputError",
    "build_info",
    "check_program",
    "config_reference",
    "config_yaml",
    "corpus_bleu4",
    "dsl_split",
    "load_config",
    "mean_rouge_l",
    "rouge_l",
    "__version__",
]

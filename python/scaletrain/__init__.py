"""scaletrain: fast, small LLM training on LibTorch.

The native module ``scaletrain._C`` holds the implementation; this package re-exports it.
"""

import torch  # noqa: F401  (loads libtorch before the native module)

from scaletrain import _C, amp, attention
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
    "amp",
    "attention",
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

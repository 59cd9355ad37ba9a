"""sampo-megatron: SamPO (length-debiased DPO) preference training on megatron-core.

Importing the package imports neither torch nor megatron-core (its modules import what they need); the
loss and the log-prob op need torch only:

    from sampo_megatron.ops import vocab_parallel_logprobs
    from sampo_megatron.losses import LossConfig, PreferenceInputs, preference_loss
"""

from .compat import torch_compile as _torch_compile

__version__ = "0.1.0"

# Before anything here imports megatron-core: no import-time torch.compile wrappers on CPU (compat/torch_compile.py).
_torch_compile.install()

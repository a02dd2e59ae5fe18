"""Which trainable tensors AdamW's decoupled weight decay applies to.

The field's convention (transformers' ``Trainer.get_decay_parameter_names``, which TRL inherits):
biases and normalisation weights are not decayed. Shrinking a norm's gain towards 0 or a bias
towards 0 is not a useful prior (neither adds capacity the way a weight matrix does), and
decaying them moved our curves 2.4e-4 away from TRL's by step 10 at weight decay 0.1. A tensor is
exempt when its lower-cased name matches one of ``NO_DECAY_PATTERNS`` (the same patterns as
transformers); ``--decay-norms-and-biases`` decays every trainable tensor instead.

The names are the backends' parameter paths (``model.layers.0.input_layernorm.weight``,
``model.layers.0.self_attn.q_proj.bias``...), which both backends share for the families they
load. The update for a decayed tensor is ``p <- p * (1 - lr * weight_decay)`` next to the Adam
step, as ``torch.optim.AdamW`` and ``mlx.optimizers.AdamW`` do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
_NO_DECAY = re.compile("|".join(NO_DECAY_PATTERNS))


def is_decayed(name: str, decay_all: bool = False) -> bool:
    """Whether weight decay applies to the trainable tensor called ``name``."""
    return decay_all or _NO_DECAY.search(name.lower()) is None


def decayed_names(names: Iterable[str], decay_all: bool = False) -> list[str]:
    """The names among ``names`` that weight decay applies to, in order."""
    return [n for n in names if is_decayed(n, decay_all)]

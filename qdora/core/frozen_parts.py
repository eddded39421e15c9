"""Where the frozen parts outside the decoder blocks live: the lm_head (dense, or NF4) and the input
embedding (on the device, or in host memory). Chosen on the meta model, before FSDP2 wraps it, so the
root group holds only what stays on the GPU; the streaming loader then fills whatever is there.

At 70B these two tables are 2 GiB each in bf16 and FSDP2 keeps the root group gathered on every GPU for
the whole step, so they decide whether 2×24 GiB fits with the base resident (qdora/tools/plan.py).
"""

from __future__ import annotations

import torch
from torch import nn

from qdora.options import EMBEDDINGS, LM_HEAD


def place_frozen_parts(model: nn.Module, lm_head: str, embeddings: str, device: torch.device | str,
                       dtype: torch.dtype, double_quant: bool = True) -> None:
    """`lm_head="nf4"`: a frozen NF4Linear head (qdora/core/nf4_head.py); `embeddings="host"`: a
    HostEmbedding whose rows travel to `device` (qdora/core/host_embedding.py). Works on meta or real
    models; "dense"/"device" leave the model as it is."""
    LM_HEAD.check(lm_head)
    EMBEDDINGS.check(embeddings)
    if lm_head == "nf4":
        from qdora.core.nf4_head import lm_head_to_nf4

        lm_head_to_nf4(model, double_quant)
    if embeddings == "host":
        from qdora.core.host_embedding import embeddings_to_host

        embeddings_to_host(model, device, dtype)

"""place_frozen_parts: each choice replaces exactly its module, on meta and real models; bad choices refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdora.core.frozen_parts import place_frozen_parts
from qdora.core.host_embedding import HostEmbedding
from qdora.core.layer import NF4Linear
from qdora.errors import QdoraError
from qdora.testing.tiny_models import tiny_config


def _meta():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config())


def test_choices_on_a_meta_model():
    m = _meta()
    place_frozen_parts(m, "dense", "device", "cpu", torch.float32)
    assert isinstance(m.lm_head, nn.Linear) and isinstance(m.get_input_embeddings(), nn.Embedding)
    place_frozen_parts(m, "nf4", "host", "cpu", torch.bfloat16)
    assert isinstance(m.lm_head, NF4Linear) and m.lm_head.base.packed.device.type == "meta"
    emb = m.get_input_embeddings()
    assert isinstance(emb, HostEmbedding) and emb.weight.dtype == torch.bfloat16
    with pytest.raises(QdoraError, match="lm-head"):
        place_frozen_parts(_meta(), "int8", "host", "cpu", torch.float32)
    with pytest.raises(QdoraError, match="embeddings"):
        place_frozen_parts(_meta(), "dense", "disk", "cpu", torch.float32)

"""Host embedding: the same rows as nn.Embedding, the table stays on the host through .to()/to_empty,
and a model using it computes exactly what the plain model computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdora.core.host_embedding import HostEmbedding, embeddings_to_host
from qdora.errors import QdoraError


def test_lookup_equals_nn_embedding_and_table_stays_on_host():
    emb = nn.Embedding(50, 16)
    host = HostEmbedding.replacing(emb, "cpu", torch.float32)
    host.set_table(emb.weight)
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(host(ids), emb(ids))
    host.to("meta")  # .to / to_empty touch parameters and buffers only
    assert host.weight.device.type == "cpu" and list(host.parameters()) == [] and list(host.buffers()) == []
    with pytest.raises(QdoraError, match="does not fit"):
        host.set_table(torch.zeros(49, 16))


def test_model_with_host_embedding_is_exact(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits
    host = embeddings_to_host(model, "cpu", torch.float32)
    assert isinstance(model.get_input_embeddings(), HostEmbedding) and host.weight.device.type == "cpu"
    assert "model.embed_tokens.weight" not in dict(model.named_parameters())
    assert torch.equal(model(input_ids=ids).logits, ref)

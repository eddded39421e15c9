"""Settings llama.cpp cannot reproduce are refused at export, before anything is written, in one message."""

from __future__ import annotations

import json
import os

import pytest

from qdora.errors import QdoraError
from qdora.export.gguf_export import export_gguf
from qdora.testing.family_cases import build_case

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch_cases")
    return {name: build_case(name, root) for name in ("qwen3", "gemma3", "gemma2", "phi3_longrope")}


def _edited(src, tmp_path, **changes):
    import shutil

    d = tmp_path / "edited"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(("case", "changes", "message"), [
    ("qwen3", {"attention_bias": True}, "attention_bias=true: llama.cpp's qwen3 has no q/k/v/o biases"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "attention_factor": 0.8}},
     "yarn with attention_factor=0.8"),
    ("qwen3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope type 'dynamic' is not supported for Qwen3"),
    ("gemma3", {"layer_types": ["full_attention"] * 6}, "differ from the pattern llama.cpp assumes"),
    ("gemma3", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar=64 is not what llama.cpp uses"),
    ("gemma3", {"final_logit_softcapping": 30.0}, "does not soft-cap the logits"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden activation 'gelu' is not supported for Gemma 2"),
    ("gemma2", {"tie_word_embeddings": False}, "read the output matrix from the token embedding"),
    ("gemma3", {"tie_word_embeddings": False}, "read the output matrix from the token embedding"),
    ("phi3_longrope", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                           "short_factor": [1.0], "long_factor": [1.0],
                                           "original_max_position_embeddings": 128}},
     "longrope short_factor must list 4 numbers"),
])
def test_refused_before_writing(cases, tmp_path, case, changes, message):
    model = _edited(cases[case], tmp_path, **changes)
    out = tmp_path / "m.gguf"
    with pytest.raises(QdoraError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        export_gguf(model, out)
    assert not out.exists() and not list(tmp_path.glob("*.gguf*"))

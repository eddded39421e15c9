"""One definition per named choice: the same values, message and exit status 1 on every command."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from qdora.cli import main
from qdora.core.adapt import AdapterSpec
from qdora.errors import QdoraError
from qdora.options import (
    DTYPE,
    METHOD,
    OFFLOAD,
    offloads_activations,
    offloads_params,
    parse_target,
    select_targets,
    torch_dtype,
)
from qdora.tools.plan import plan_memory
from qdora.tools.presets import preset_config
from qdora.train.config import resolve_config

PATHS = [f"model.layers.{n}.{part}" for n in range(2)
         for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]


def test_choice_names_every_allowed_value():
    assert METHOD.check("lora") == "lora"
    with pytest.raises(QdoraError, match=r"unknown offload 'disk': choose one of none, activations, params, all"):
        OFFLOAD.check("disk")
    assert DTYPE.metavar == "bf16|fp16|fp32"


def test_one_dtype_table_for_short_and_torch_names():
    assert torch_dtype("bf16") is torch_dtype("bfloat16") is torch_dtype("BF16") is torch.bfloat16
    assert torch_dtype("fp32") is torch.float32 and torch_dtype("float16") is torch.float16
    with pytest.raises(QdoraError, match="unknown dtype 'int8'"):
        torch_dtype("int8")


def test_offload_modes():
    assert [(offloads_params(o), offloads_activations(o)) for o in OFFLOAD.values] == [
        (False, False), (False, True), (True, False), (True, True)]
    with pytest.raises(QdoraError, match="unknown offload"):
        offloads_params("gpu")


@pytest.mark.parametrize("target,expected", [
    ("all-linear", PATHS),
    ("q_proj", [p for p in PATHS if p.endswith("q_proj")]),  # one name is a name, not a regex
    (" q_proj , up_proj ,", [p for p in PATHS if p.endswith(("q_proj", "up_proj"))]),
    (["down_proj"], [p for p in PATHS if p.endswith("down_proj")]),
    (r".*\.1\.mlp\..*", ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]),
    (r".*\.(q|v)_proj", [p for p in PATHS if p.endswith(("q_proj", "v_proj"))]),
])
def test_target_grammar(target, expected):
    assert select_targets(target, PATHS, "M") == expected


@pytest.mark.parametrize("target,match", [
    ("", "empty target"),
    (",", "empty target"),
    ("q_proj,qkv_proj", "no module of M matches target qkv_proj; .* are: down_proj, q_proj, up_proj, v_proj"),
    (r".*\.7\..*", "no module of M matches target"),
    ("(q_proj", "neither .* nor a valid regex"),
])
def test_bad_targets(target, match):
    with pytest.raises(QdoraError, match=match):
        select_targets(target, PATHS, "M")


def test_train_and_plan_share_the_target_grammar(tiny_llama_dir):
    from qdora.core.adapt import find_targets
    from qdora.core.load import meta_model

    cfg = resolve_config({}, {"model": "m", "data": "d", "output": "o", "target": "q_proj"})
    assert parse_target(cfg.target).names == ("q_proj",)
    model = meta_model(tiny_llama_dir)  # what `qdora train` adapts: one name means that linear in every block
    assert find_targets(model, AdapterSpec(target=cfg.target).target) == [
        f"model.layers.{n}.self_attn.q_proj" for n in range(model.config.num_hidden_layers)]
    config = preset_config("8b")
    one = plan_memory(config, target="q_proj").details["adapter_params"]
    assert plan_memory(config, target=r"model\.layers\.\d+\.self_attn\.q_proj").details["adapter_params"] == one
    assert plan_memory(config, target="q_proj,v_proj").details["adapter_params"] > one
    with pytest.raises(QdoraError, match="empty target"):
        resolve_config({}, {"model": "m", "data": "d", "output": "o", "target": " "})


@pytest.mark.parametrize("args,match", [
    (["plan", "--model", "llama-3-8b", "--method", "ia3"], "unknown method 'ia3': choose one of dora, lora"),
    (["plan", "--model", "llama-3-8b", "--offload", "disk"], "unknown offload 'disk'"),
    (["plan", "--model", "llama-3-8b", "--loss", "fused"], "unknown loss 'fused'"),
    (["plan", "--model", "llama-3-8b", "--target", "qkv_proj"], "matches target qkv_proj"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--method", "ia3"], "unknown method 'ia3'"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--offload", "disk"], "unknown offload 'disk'"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--target", "(q"], "neither .* nor a valid regex"),
    (["merge", "--adapter", "a", "--output", "o", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["merge", "--adapter", "a", "--output", "o", "--base", "nf4"], "unknown base 'nf4'"),
    (["analyze", "--adapter", "a", "--output", "o", "--base", "nf4"], "unknown base 'nf4'"),
])
def test_every_command_refuses_a_bad_choice_with_exit_1(tmp_path, args, match):
    import re

    out = tmp_path / "o"
    args = [str(out) if a == "o" else a for a in args]
    res = CliRunner().invoke(main, args)
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert res.exit_code == 1, res.output
    assert len(errors) == 1 and re.search(match, errors[0]), res.output
    assert "Traceback" not in res.output and not out.exists()

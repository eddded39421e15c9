"""`qdora analyze`: ΔM/ΔD by hand on known weights, adapters, fine-tuned checkpoints, trajectories."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from qdora.cli import main
from qdora.core.nf4 import nf4_from_weight
from qdora.errors import QdoraError
from qdora.export.adapter_merge import AdapterMerge
from qdora.testing.adapters import make_adapter
from qdora.testing.tiny_models import build_tiny_model
from qdora.tools.analyze import analyze_adapter, analyze_checkpoints, run_analysis
from qdora.tools.decomposition import decomposition_change, summarize

Q = "model.layers.1.self_attn.q_proj.weight"


def test_row_scaling_changes_magnitude_only():
    w = torch.randn(32, 64)
    c = torch.rand(32) + 0.5
    dm, dd = decomposition_change(w, w * c[:, None])
    assert dd == pytest.approx(0.0, abs=1e-12)
    assert dm == pytest.approx(((c - 1).abs() * w.norm(dim=1)).mean().item(), rel=1e-6)


def test_rotation_changes_direction_only():
    w = torch.randn(32, 64, dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    dm, dd = decomposition_change(w, w @ rot)
    cos = torch.nn.functional.cosine_similarity(w, w @ rot, dim=1)
    assert dm == pytest.approx(0.0, abs=1e-9)
    assert dd == pytest.approx((1 - cos).mean().item(), rel=1e-9) and dd > 0.1


def finetuned_copy(base_dir, out, edit):
    shutil.copytree(base_dir, out)
    state = load_file(str(out / "model.safetensors"))
    edit(state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_finetuned_checkpoint_by_hand(tiny_llama_dir, tmp_path):
    c = torch.linspace(0.5, 1.5, 64)
    ft = finetuned_copy(tiny_llama_dir, tmp_path / "ft", lambda s: s[Q].mul_(c[:, None]))
    res = CliRunner().invoke(main, ["analyze", "--finetuned", str(ft), "--base-model", str(tiny_llama_dir),
                                    "--output", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    with (tmp_path / "out" / "decomposition.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 14 and set(rows[0]) == {"step", "layer", "module", "delta_m", "delta_d"}
    q = [r for r in rows if r["layer"] == "1" and r["module"] == "q_proj"][0]
    w = load_file(str(tiny_llama_dir / "model.safetensors"))[Q]
    assert float(q["delta_m"]) == pytest.approx(((c - 1).abs() * w.norm(dim=1)).mean().item(), rel=1e-5)
    assert float(q["delta_d"]) == pytest.approx(0.0, abs=1e-6)
    assert all(float(r["delta_m"]) == 0.0 for r in rows if r is not q)
    assert (tmp_path / "out" / "decomposition.png").stat().st_size > 10_000
    assert "q_proj" in res.output and "r(ΔD,ΔM)" in res.output
    # against the dequantized base, the untouched weights differ by exactly the NF4 error
    from qdora.tools.analyze import analyze_finetuned

    deq = analyze_finetuned(ft, tiny_llama_dir, base="dequantized")
    w0 = load_file(str(tiny_llama_dir / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    expect = decomposition_change(nf4_from_weight(w0).dequantize(torch.float32), w0)
    got = [r for r in deq if r.layer == 0 and r.module == "up_proj"][0]
    assert (got.delta_m, got.delta_d) == pytest.approx(expect, rel=1e-6)


def test_adapter_rows_are_the_merged_weight_against_the_dequantized_base(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", "dora", target=["q_proj", "v_proj"])
    rows = analyze_adapter(adapter)
    assert [(r.layer, r.module) for r in rows] == [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]
    plan = AdapterMerge.load(adapter)
    w_hat = nf4_from_weight(plan.reader.get(Q)).dequantize(torch.float32)
    a, b, m = plan.adapters[Q]
    merged = m[:, None] * (w_hat + plan.scale * b @ a) / (w_hat + plan.scale * b @ a).norm(dim=1, keepdim=True)
    assert (rows[2].delta_m, rows[2].delta_d) == pytest.approx(decomposition_change(w_hat, merged), rel=1e-5)
    assert rows[2].step is None and rows[2].delta_d > 0


def test_trajectory_over_checkpoints(tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    first = make_adapter(tiny_llama_dir, run / "checkpoint-10", "dora", target=["q_proj", "down_proj"], seed=2)
    shutil.copytree(first, run / "checkpoint-20")
    state = load_file(str(run / "checkpoint-20" / "adapter_model.safetensors"))
    save_file({k: v * 2 if "lora_B" in k else v for k, v in state.items()},
              str(run / "checkpoint-20" / "adapter_model.safetensors"))
    dirs = sorted(run.glob("checkpoint-*"), reverse=True)
    rows = analyze_checkpoints(dirs)
    assert [r.step for r in rows] == [10] * 4 + [20] * 4
    assert all(late.delta_d > early.delta_d for early, late in zip(rows[:4], rows[4:], strict=True))
    res = CliRunner().invoke(main, ["analyze", "--checkpoints", *map(str, dirs), "--output", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    with (tmp_path / "o" / "decomposition.csv").open() as f:
        assert {r["step"] for r in csv.DictReader(f)} == {"10", "20"}
    s = {x.module: x for x in summarize(rows)}
    assert s["q_proj"].n == 4 and not math.isnan(s["q_proj"].pearson_r)


def test_bad_inputs(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", "lora", target=["q_proj"])
    other = build_tiny_model(tmp_path / "wide", hidden_size=128, intermediate_size=256)
    cases = [
        (dict(adapter=adapter, finetuned=other), "exactly one of"),
        (dict(), "exactly one of"),
        (dict(finetuned=other), "needs --base-model"),
        (dict(finetuned=other, base_model=tiny_llama_dir), "does not match"),
        (dict(finetuned=tmp_path / "nope", base_model=tiny_llama_dir), "not a local model folder"),
        (dict(checkpoints=[adapter]), "checkpoint-STEP"),
        (dict(adapter=adapter, base_model=other), "does not fit"),
    ]
    for kwargs, match in cases:
        with pytest.raises(QdoraError, match=match):
            run_analysis(tmp_path / "out", **kwargs)
        assert not (tmp_path / "out").exists()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3-8B"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(main, ["analyze", "--adapter", str(adapter), "--output", str(tmp_path / "out")])
    # a Hub id is looked up in the Hub cache (offline in tests): one message, no traceback
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "meta-llama/Llama-3-8B is not in the Hub cache" in res.output

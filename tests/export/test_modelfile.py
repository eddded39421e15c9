"""Render the Modelfile TEMPLATEs with Go's text/template (what Ollama runs) and compare with the HF chat
template on the same conversation. Skipped where no `go` toolchain is installed."""

from __future__ import annotations

import json
import subprocess

import pytest

from qdora.export.gguf_export import export_gguf
from qdora.testing.family_cases import build_case

GO_RENDER = r"""
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var in struct {
		Template string
		System   string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("m").Parse(in.Template))
	// Ollama passes the system prompt both as .System and as messages of role "system".
	if err := t.Execute(os.Stdout, map[string]any{"System": in.System, "Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What colour is the fox?"},
    {"role": "assistant", "content": "The fox is red."},
    {"role": "user", "content": "And the owl?"},
]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama", "qwen2", "mistral_spm", "qwen3", "gemma3", "phi3", "phi4_mini",
                                  "mistral_tekken"])
def test_go_template_renders_like_the_hf_chat_template(tmp_path, case):
    from transformers import AutoTokenizer

    model_dir = build_case(case, tmp_path / "models")
    export_gguf(model_dir, tmp_path / "m.gguf", modelfile=True)
    text = (tmp_path / "Modelfile").read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    (tmp_path / "render.go").write_text(GO_RENDER)
    payload = {
        "Template": template,
        "System": CONVERSATION[0]["content"],
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in CONVERSATION],
    }
    rendered = subprocess.run(
        ["go", "run", str(tmp_path / "render.go")], input=json.dumps(payload), capture_output=True, text=True,
        check=True, cwd=tmp_path,
    ).stdout
    tok = AutoTokenizer.from_pretrained(model_dir)
    expected = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    if tok.bos_token and expected.startswith(tok.bos_token):
        expected = expected[len(tok.bos_token):]  # llama.cpp adds BOS itself (add_bos_token)
    assert rendered == expected

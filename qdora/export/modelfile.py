"""An Ollama Modelfile for an exported GGUF: the chat format as a Go template, and its stop strings.

Ollama does not run the Jinja chat template stored in the GGUF; it renders its own Go `TEMPLATE`. The
format is recognised from the vocabulary (its special tokens), which is what the model was trained on.
"""

from __future__ import annotations

from pathlib import Path

from qdora.errors import QdoraError
from qdora.export.gguf_tokenizer import VocabInfo
from qdora.io.atomic import atomic_write

# Llama 3: header blocks, every turn closed by <|eot_id|>; the prompt ends with an open assistant header.
LLAMA3_GO_TEMPLATE = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
LLAMA3_STOPS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# ChatML (Qwen2): <|im_start|>role\ncontent<|im_end|>\n per message.
CHATML_GO_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
CHATML_STOPS = ["<|im_start|>", "<|im_end|>"]

# Llama 2 / Mistral: [INST] user [/INST] answer</s>; a system message opens the next user turn.
INST_GO_TEMPLATE = """{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}"""
INST_STOPS = ["[INST]", "[/INST]", "</s>"]


# Gemma 2 / 3: <start_of_turn>user ... <end_of_turn>, the assistant turn is "model"; a system message goes in
# front of the next user turn (Gemma 3's template), separated by a blank line.
GEMMA_GO_TEMPLATE = """{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""
GEMMA_STOPS = ["<start_of_turn>", "<end_of_turn>"]

# Phi-3 / 3.5 / Phi-4-mini: <|role|>\ncontent<|end|>\n per message, then <|assistant|>\n.
PHI3_GO_TEMPLATE = """{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""
PHI3_STOPS = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"]

# Phi-4-mini: the same markers without newlines (its template is not Phi-3's).
PHI4_GO_TEMPLATE = """{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>
{{- end }}<|assistant|>"""

# Mistral Small 3 / Nemo with Tekken (V7): control tokens, no spaces around them.
TEKKEN_GO_TEMPLATE = """{{- range .Messages }}
{{- if eq .Role "system" }}[SYSTEM_PROMPT]{{ .Content }}[/SYSTEM_PROMPT]
{{- else if eq .Role "user" }}[INST]{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}{{ .Content }}</s>
{{- end }}
{{- end }}"""
TEKKEN_STOPS = ["[INST]", "[/INST]", "</s>"]

TEMPLATES = {
    "llama3": (LLAMA3_GO_TEMPLATE, LLAMA3_STOPS),
    "chatml": (CHATML_GO_TEMPLATE, CHATML_STOPS),
    "inst": (INST_GO_TEMPLATE, INST_STOPS),
    "gemma": (GEMMA_GO_TEMPLATE, GEMMA_STOPS),
    "phi3": (PHI3_GO_TEMPLATE, PHI3_STOPS),
    "phi4": (PHI4_GO_TEMPLATE, PHI3_STOPS),
    "tekken": (TEKKEN_GO_TEMPLATE, TEKKEN_STOPS),
}


def chat_format(vocab: VocabInfo) -> str:
    """One of TEMPLATES' formats, from the special tokens the vocabulary defines."""
    tokens = set(vocab.tokens)
    if "<|start_header_id|>" in tokens and "<|eot_id|>" in tokens:
        return "llama3"
    if "<|im_start|>" in tokens and "<|im_end|>" in tokens:
        return "chatml"
    if "<start_of_turn>" in tokens and "<end_of_turn>" in tokens:
        return "gemma"
    if {"<|user|>", "<|assistant|>", "<|end|>"} <= tokens:
        return "phi4" if vocab.model == "gpt2" else "phi3"  # Phi-4-mini: byte-level BPE, no newlines
    if {"[INST]", "[/INST]", "[SYSTEM_PROMPT]"} <= tokens and vocab.model == "gpt2":
        return "tekken"
    if vocab.model == "llama":
        return "inst"
    raise QdoraError(
        "cannot tell the chat format for the Modelfile: the vocabulary has none of the Llama 3, ChatML, Gemma, "
        "Phi-3 or Tekken control tokens, and it is not a SentencePiece ([INST]) vocabulary"
    )


def modelfile_text(gguf_name: str, vocab: VocabInfo) -> str:
    """The Modelfile's content for a GGUF file `gguf_name` lying in the same folder."""
    template, stops = TEMPLATES[chat_format(vocab)]
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{template}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, vocab: VocabInfo) -> Path:
    """Write `Modelfile` next to the GGUF (atomically) and return its path."""
    path = gguf_path.parent / "Modelfile"
    return atomic_write(path, lambda tmp: tmp.write_text(modelfile_text(gguf_path.name, vocab), encoding="utf-8"))

"""After training: merge an adapter into a full-precision checkpoint, convert it to GGUF (+ Ollama Modelfile)."""

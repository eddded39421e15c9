"""Files: model weights in safetensors (streamed in and out), and writing any file atomically."""

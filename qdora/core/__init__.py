"""The QDoRA model: NF4 storage, the adapted layer and its autograd function, putting layers into a model,
streaming a checkpoint into it, and adapters in PEFT's format."""

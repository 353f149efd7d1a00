"""TensorRT / TensorRT-RTX: graph preparation, engine builds, engine inspection."""

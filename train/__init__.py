"""Training over dsv3c.models: MTP loss, auxiliary-loss-free balancing, BF16 or DeepSeek's FP8 recipe."""

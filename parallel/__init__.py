"""Expert parallelism over torch.distributed: partition plans and all-to-all dispatch."""

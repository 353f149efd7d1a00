"""Measuring a model on held-out text: loss, perplexity, and agreement with a reference model.

`dsv3c eval` is the instrument the fidelity and MTP results are measured with: the same fixed windows of
tokenized text go through any checkpoint folder (PyTorch) or export folder (onnxruntime), and the
comparison with a reference is made token by token on the logits.
"""

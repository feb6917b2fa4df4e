"""SSAH: safety-critical units (Li & Kim, arXiv 2410.10862).

``config`` (every parameter: scoring, labels, protection), ``units`` (heads and neurons, their
expansion to tensors), ``method`` (scoring, labels, the merge kernel), ``freezing`` (the same
artifact as gradient hooks during fine-tuning), ``inspect`` (per-layer report and heat map).
Import-light on purpose: the CLI reads ``config`` without importing torch.
"""

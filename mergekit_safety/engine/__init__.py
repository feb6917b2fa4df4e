"""The engine: everything that reads models and data, for any method.

``checkpoint`` (the one safetensors reader), ``tokenizer``, ``data`` (JSONL, chat encoding,
batching), ``modules`` (the ``modules`` grammar), ``seeding`` (per-tensor seeds) and
``calibration`` (activation statistics through hooks, streamed layer by layer). Nothing here
knows mergekit or any merge method.
"""

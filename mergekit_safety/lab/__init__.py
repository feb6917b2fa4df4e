"""The safety lab: a tiny word-level language, real Llama models (pretrained, aligned,
experts), held-out data sets and an exact evaluator. See docs/lab.md.

Modules: ``language`` (vocabulary, skills, tokenizer, chat template), ``train`` (model and SFT
loop), ``build`` (cached, atomic lab build), ``evaluate`` (refusal / over-refusal / accuracy),
``demo`` (all merges/*.yml compared), ``sweep`` (plain-fusion tuning), ``commands`` (CLI).
Nothing heavy is imported here.
"""

"""The real chat-model testbed: SmolLM2-135M-Instruct → aligned → LoRA experts → plain fusions.

``python -m mergekit_safety.testbed --work DIR [--stages ...] [--device cpu|cuda]``; see
docs/testbed.md. Apart from the library on purpose: nothing in ``mergekit_safety`` imports this
package, and importing it loads only the standard library (torch, transformers, peft are
imported inside the stages).
"""

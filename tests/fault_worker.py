"""Subprocess for tests/test_faults.py: runs a locate or a merge and kills itself part-way.

usage: fault_worker.py MODE CONFIG OUT KILL_AT SIGNAL
  MODE    locate | merge
  KILL_AT compute (inside the locate computation) | write (half-way through writing the
          artifact) | tensor:N (at the N-th merged tensor) | never
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))


def main(mode, config, out, kill_at, signal_name):
    import mergekit.merge_methods  # noqa: F401  (plugin registration)
    from mergekit.merge_methods import registry

    from test_locate import ToyLocate

    from mergekit_safety.plugin.adapter import MergekitMethod

    sig = getattr(signal, signal_name)
    method = ToyLocate()
    if method.name not in registry._METHODS:
        registry.register(MergekitMethod(method))

    def die():
        os.kill(os.getpid(), sig)

    if kill_at == "compute":
        original = ToyLocate.compute_artifact

        def compute(self, request):
            original(self, request)
            die()

        ToyLocate.compute_artifact = compute
    elif kill_at == "write":
        import safetensors.torch

        def half_write(tensors, filename, metadata=None):
            with open(filename, "wb") as handle:
                handle.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\"")
                handle.flush()
            die()

        safetensors.torch.save_file = half_write
    elif kill_at.startswith("tensor:"):
        limit = int(kill_at.split(":")[1])
        original_merge = ToyLocate.merge
        seen = []

        def merge(self, inputs, parameters):
            seen.append(inputs.name)
            if len(seen) == limit:
                die()
            return original_merge(self, inputs, parameters)

        ToyLocate.merge = merge

    if mode == "locate":
        from mergekit_safety.plugin.config import locate_config

        print(locate_config(config))
    else:
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        with open(config) as handle:
            merge_config = MergeConfiguration.model_validate(yaml.safe_load(handle))
        run_merge(merge_config, out, options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))


if __name__ == "__main__":
    main(*sys.argv[1:6])

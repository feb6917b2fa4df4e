"""The plain fusion of a base model and experts as a weight source, tensor by tensor.

Calibration of a fused model (Antidote's ``apply_to: fusion``) needs its weights, not a fused
checkpoint on disk: :class:`FusedSource` computes each tensor on demand with the merge's own
kernel and per-tensor seeding, so the tensors equal the ones the merge would write without masks.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

import torch

from mergekit_safety.engine.calibration import CalibrationError, WeightSource
from mergekit_safety.engine.seeding import seeded
from mergekit_safety.fusion.kernel import fuse


class FusedSource(WeightSource):
    """θ_A + Merge(θ_i − θ_A) computed per tensor with :func:`~mergekit_safety.fusion.kernel.fuse`.

    ``fuse_kwargs`` are passed to ``fuse`` (backbone, weights, densities, lambda_, normalize,
    rescale, int8_mask); ``seed`` seeds random backbones per tensor exactly as the merge does.
    """

    def __init__(self, base: WeightSource, experts: Sequence[WeightSource], fuse_kwargs: Mapping[str, Any], seed: Optional[int] = None):
        self.base = base
        self.experts = list(experts)
        self.fuse_kwargs = dict(fuse_kwargs)
        self.seed = seed

    def names(self) -> List[str]:
        return self.base.names()

    def has(self, name: str) -> bool:
        return self.base.has(name)

    def get(self, name: str) -> torch.Tensor:
        fused = self._fuse(name, lambda source: source.get(name))
        if self.experts:
            # the fused tensor is new memory: the inputs' memory-mapped pages can go now, not
            # after the whole layer (they count in the resident set while mapped)
            self.release()
        return fused

    def get_rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """The fused rows alone where the backbone is elementwise (task arithmetic, mean); TIES
        and DARE select over the whole tensor, so those fuse it whole first."""
        from mergekit_safety.fusion.kernel import BACKBONES, Backbone

        definition = BACKBONES[Backbone(self.fuse_kwargs.get("backbone", "task_arithmetic"))]
        if definition.sparsification is not None or definition.consensus:
            return self.get(name)[index]
        return self._fuse(name, lambda source: source.get_rows(name, index))

    def _fuse(self, name: str, read) -> torch.Tensor:
        """``fuse`` of what ``read`` gives for the base and each expert (shapes checked)."""
        base = read(self.base).to(torch.float32)
        experts = []
        for expert in self.experts:
            tensor = read(expert).to(torch.float32)
            if tensor.shape != base.shape:
                raise CalibrationError(
                    f"tensor {name}: expert {expert.describe()} has shape {list(tensor.shape)}, "
                    f"base {self.base.describe()} has {list(base.shape)}"
                )
            experts.append(tensor)
        with seeded(self.seed, name):
            return fuse(base, experts, **self.fuse_kwargs)

    def describe(self) -> str:
        return f"fusion of {self.base.describe()} and {len(self.experts)} experts"

    def release(self) -> None:
        self.base.release()
        for expert in self.experts:
            expert.release()

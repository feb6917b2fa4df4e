"""A :class:`~mergekit_safety.fusion.method.FusionMethod` as a mergekit 0.1.5 merge method.

mergekit knows a method by its :class:`MergeMethodSpec` (name, parameters with scope, type
and default) and calls ``merge_group`` once per output tensor with a :class:`TensorGroup`.
:class:`MergekitMethod` derives the spec from the method's settings (the single declaration
of its parameters), turns each group into :class:`~mergekit_safety.fusion.method.TensorInputs`
(per-model parameters as lists in expert order) and runs the method. It also runs the
config checks at plan time, before any tensor is loaded.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Dict

import torch

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    TensorGroup,
)

from mergekit_safety.fusion.method import FusionMethod, TensorInputs
from mergekit_safety.plugin.specs import parameter_specs


def is_model_reference(value: Any) -> bool:
    return type(value).__name__ == "ModelReference"


class MergekitMethod(GroupMergeMethod):
    """mergekit's view of one of this package's methods."""

    def __init__(self, method: FusionMethod):
        self.method = method

    @property
    def summary(self) -> str:
        return self.method.summary

    @cached_property
    def spec(self) -> MergeMethodSpec:
        method = self.method
        return MergeMethodSpec(
            name=method.name,
            pretty_name=method.pretty_name,
            reference_url=method.reference_url,
            parameters=parameter_specs(method.settings),
            contract=InputContract(base=BasePolicy.REQUIRED),
        )

    # ---- plan time

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        super().validate_inputs(input_ids, base_id, group_name=group_name)
        config = planning_config()
        if config is not None:
            from mergekit_safety.plugin.checks import check_at_plan_time

            check_at_plan_time(config)
            self._vocabulary = output_vocabulary(config)

    _vocabulary = None  # output row → base-vocabulary row of the merge being planned

    def vocabulary_for(self, name: str, rows: int):
        """The output → base row map for a vocabulary tensor of ``rows`` rows (None if the
        output vocabulary is the base's)."""
        from mergekit_safety.engine.vocabulary import is_vocabulary_tensor

        vocabulary = self._vocabulary
        if vocabulary is None or not is_vocabulary_tensor(name) or vocabulary.numel() != rows:
            return None
        return vocabulary

    # ---- per tensor

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        experts = group.non_base
        references = is_model_reference(group.base.id)
        inputs = TensorInputs(
            name=group.metadata.name or "",
            base=group.base.tensor,
            experts=[entry.tensor for entry in experts],
            base_model=group.base.id if references else None,
            expert_models=[entry.id for entry in experts] if references else None,
            labels=[group.base.id] + [entry.id for entry in experts],
            vocabulary=self.vocabulary_for(group.metadata.name or "", group.base.tensor.shape[0] if group.base.tensor.dim() else 0),
        )
        return self.method.merge(inputs, self.as_lists(parameters, group))

    def as_lists(self, parameters: Dict[str, Any], group: TensorGroup) -> Dict[str, Any]:
        """Per-model parameters (mergekit: a mapping by input id) as lists in expert order."""
        out = {}
        for name, value in parameters.items():
            if hasattr(value, "values_for") or isinstance(value, dict):
                out[name] = [value[entry.id] for entry in group.non_base]
            else:
                out[name] = value
        return out


def output_vocabulary(config):
    """For a merge whose output vocabulary is not the base model's (``tokenizer_source: union``
    or a model, or added tokens): output row → base row (-1 for a token the base lacks), from
    mergekit's own tokenizer build — the permutation it applies to the base's embeddings.
    None when the output vocabulary is the base's."""
    import torch

    tokenizer = getattr(config, "tokenizer", None)
    source = getattr(tokenizer, "source", None) if tokenizer is not None else config.tokenizer_source
    added = tuple((getattr(tokenizer, "tokens", None) or {}).keys()) if tokenizer is not None else ()
    if source is None or (source == "base" and not added) or config.base_model is None:
        return None
    from mergekit.tokenizer.build import build_tokenizer

    info = build_tokenizer(
        base_model=config.base_model,
        referenced_models=list(config.referenced_models()),
        tokenizer_source=source,
        trust_remote_code=False,
        add_tokens=list(added),
    )
    permutation = info.permutations.get(config.base_model, {})
    rows = torch.full((len(info.tokenizer.get_vocab()),), -1, dtype=torch.long)
    for out_row, base_row in permutation.items():
        if 0 <= out_row < rows.numel():
            rows[out_row] = base_row
    if rows.numel() and bool((rows == torch.arange(rows.numel())).all()):
        return None  # the base's own order: nothing to map
    return rows


def planning_config():
    """The MergeConfiguration mergekit's planner is validating, if we are called from it.

    mergekit 0.1.5 gives methods no plan-time view of their parameters; the planner calls
    ``validate_inputs`` once per slice before any tensor task exists, so the config is
    found on the caller's frame. Any other caller (tests, direct API) gets None.
    """
    import sys

    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "MergePlanner" and frame.f_code.co_name == "normalize_config":
            return getattr(owner, "config", None)
        frame = frame.f_back
    return None

"""``safe_lora``: project updates onto the alignment subspace (Hsu et al., NeurIPS 2024, arXiv 2405.16833).

Per weight matrix W (the 2-D Linear weights of the decoder layers, narrowed by ``modules``):

    V = W_A − W_U                      (aligned minus unaligned: the alignment direction)
    C = V Vᵀ / ‖V‖_F                   (the paper's alignment projector)
    cos(ΔW) = ⟨C ΔW, ΔW⟩_F / (‖C ΔW‖_F ‖ΔW‖_F)

and where the update ΔW strays from the alignment subspace — ``cos < threshold``, or among the
``top_k`` lowest cosines — it is replaced by its projection C ΔW. The update is each expert's
task vector τ_i (``apply_to: experts``, the paper's form: each fine-tune projected before the
fusion) or the fused update (``apply_to: fusion``). C is never formed when V is tall: C ΔW is
computed as V (Vᵀ ΔW) / ‖V‖_F or (V Vᵀ) ΔW / ‖V‖_F, whichever is cheaper.

Data-free. With a ``threshold`` (the default) each layer's choice needs only its own cosine, so
it is made in the merge from the tensors mergekit already holds: no pass of its own over the
models, no artifact. ``top_k`` ranks every layer and ``control: random`` needs their count, so
those compute the cosines once from the models (a locate step without data: base, experts and
the unaligned model are fingerprinted) and store them as an artifact, which ``threshold``/
``top_k``/``control`` then read without recomputation; an explicit ``mask`` file takes that path
too (bit-identical to the merge-time choice, tested). Only the cosines a method reads are
computed: each expert's (``apply_to: experts``) or the fused update's. Streaming: one tensor of
each model at a time. ``control: random`` projects a seeded random set of the same number of
layers.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, ClassVar, Dict, List, Literal, Optional, Sequence, Tuple

import torch

from mergekit_safety.engine.seeding import tensor_seed
from mergekit_safety.fusion.artifacts import tensor_key
from mergekit_safety.fusion.kernel import TensorMasks
from mergekit_safety.fusion.method import LocatingFusionMethod, TensorInputs, model_tensor
from mergekit_safety.fusion.settings import AUTO, LocatingSettings, NonNegativeInt, setting

logger = logging.getLogger(__name__)

COSINE_ROLE = "cosine"
FUSION = "fusion"


class ProjectionSettings(LocatingSettings):
    """Parameters shared by the methods that measure updates against the alignment subspace."""

    artifact_depends_on_fusion: ClassVar[bool] = True  # the fused update's cosines are stored

    unaligned_model: str = setting(
        "",
        "the unaligned counterpart θ_U of the base model (a local model folder): the alignment "
        "direction is θ_A − θ_U. Empty = nothing is projected (the plain backbone, with a warning)",
        model=True,
    )
    modules: str = setting("linear", "weights considered: presets (attention, mlp, linear) or regexes on tensor names", locate=True)
    threshold: float = setting(0.5, "act on the layers whose update has a projected cosine below this")
    top_k: NonNegativeInt = setting(0, "instead of the threshold: act on the k lowest-cosine layers (0 = use the threshold)")
    control: Literal["none", "random"] = setting("none", "random: act on a seeded random set of the same number of layers (control)")
    control_seed: int = setting(0, "seed of the random control")


class SafeLoRASettings(ProjectionSettings):
    apply_to: Literal["experts", "fusion"] = setting(
        "experts", "experts: project each expert's task vector before the fusion (paper); fusion: the fused update",
        locate=True,  # which cosines the artifact holds
    )


def projected(update: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """C·ΔW with C = V Vᵀ / ‖V‖_F, without forming C when it is the larger product."""
    return AlignmentProjector(alignment)(update)


class AlignmentProjector:
    """C·ΔW for the updates of one weight, in the alignment's dtype (float32 in the merge).

    When V is wide (rows ≤ columns) the Gram matrix V Vᵀ is formed once and shared by every
    update of the weight (one product per expert instead of two); when V is tall, V (Vᵀ ΔW)."""

    def __init__(self, alignment: torch.Tensor) -> None:
        self.alignment = alignment
        self.norm = float(torch.linalg.vector_norm(alignment, dtype=torch.float64))
        self._gram: Optional[torch.Tensor] = None

    def __call__(self, update: torch.Tensor) -> torch.Tensor:
        if self.norm == 0:
            return torch.zeros_like(update)
        return self._image(update.to(self.alignment.dtype)) / self.norm

    def _image(self, update: torch.Tensor) -> torch.Tensor:
        v = self.alignment
        rows, columns = v.shape
        if rows <= columns:
            if self._gram is None:
                self._gram = v @ v.T
            return self._gram @ update
        return v @ (v.T @ update)

    def image_and_cosine(self, update: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """(C·ΔW, cos(C ΔW, ΔW)) from one product chain: the merge-time layer choice."""
        if self.norm == 0:
            return torch.zeros_like(update), 1.0
        u = update.to(self.alignment.dtype)
        image = self._image(u)
        denominator = float(image.norm()) * float(u.norm())
        cosine = 1.0 if denominator == 0 else min(float(torch.vdot(image.reshape(-1), u.reshape(-1))) / denominator, 1.0)
        return image / self.norm, cosine


def projected_cosines(updates: Sequence[torch.Tensor], alignment: torch.Tensor) -> List[float]:
    """cos(C ΔW, ΔW) for several updates of one weight (1.0 for a zero update or a zero V).

    The cosine does not depend on C's scale, so ‖V‖ is left out, and the products on V are
    shared: for a wide V one Gram matrix G = V Vᵀ (cos = ⟨GΔ, Δ⟩ / ‖GΔ‖‖Δ‖); for a tall V,
    M = Vᵀ Δ and H = Vᵀ V (⟨V Vᵀ Δ, Δ⟩ = ‖M‖², ‖V Vᵀ Δ‖² = ⟨H M, M⟩), so no product is larger
    than rows·columns². In float32 (BLAS dot products for the sums): 3–4× less work than the
    float64 products of the two-sided formula, agreeing with it to 1e-5 (tested)."""
    v = alignment.float()
    rows, columns = v.shape
    wide = rows <= columns
    gram = v @ v.T if wide else v.T @ v

    def dot(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.vdot(a.reshape(-1), b.reshape(-1)))

    out: List[float] = []
    for update in updates:
        u = update.float()
        u_norm = float(u.norm())
        if wide:
            image = gram @ u
            inner, image_norm = dot(image, u), float(image.norm())
        else:
            m = v.T @ u
            inner = dot(m, m)
            image_norm = max(dot(gram @ m, m), 0.0) ** 0.5
        denominator = image_norm * u_norm
        out.append(1.0 if denominator == 0 else min(inner / denominator, 1.0))
    return out


def projected_cosine(update: torch.Tensor, alignment: torch.Tensor) -> float:
    """cos(C ΔW, ΔW) of one update (1.0 for a zero update: nothing to project)."""
    return projected_cosines([update], alignment)[0]


def candidate_names(base_dir: str, modules: str) -> List[str]:
    """The 2-D Linear weights of the decoder layers that ``modules`` selects."""
    from mergekit_safety.engine.calibration import linear_weight_names

    return linear_weight_names(base_dir, modules)


def chosen_layers(cosines: Dict[str, float], threshold: float, top_k: int, control: str, seed: int) -> set:
    """The tensor names acted on: below the threshold (or the k lowest), or — for the random
    control — a seeded random set of the same size."""
    if top_k:
        chosen = set(sorted(cosines, key=lambda n: (cosines[n], n))[:top_k])
    else:
        chosen = {n for n, c in cosines.items() if c < threshold}
    if control == "random":
        names = sorted(cosines)
        generator = torch.Generator().manual_seed(tensor_seed(seed, "layers"))
        order = torch.randperm(len(names), generator=generator).tolist()
        chosen = {names[i] for i in order[: len(chosen)]}
    return chosen


class ProjectionMethod(LocatingFusionMethod):
    """Shared by ``safe_lora`` and ``safemerge``: the cosines of every update, once."""

    artifact_roles = (COSINE_ROLE,)

    def __init__(self) -> None:
        super().__init__()
        self._choices: Dict[tuple, Tuple[List[set], set]] = {}
        self._candidates: Dict[tuple, frozenset] = {}
        self._tallies: Dict[tuple, Tuple[int, int]] = {}
        self._tally_lock = threading.Lock()

    def can_locate(self, parameters: Dict[str, Any]) -> bool:
        if parameters.get("unaligned_model"):
            return True
        if not getattr(self, "_warned_unaligned", False):
            self._warned_unaligned = True
            logger.warning("%s: no unaligned_model given: merging with the plain backbone, WITHOUT safety restoration", self.name)
        return False

    def cosine_sets(self, parameters: Dict[str, Any]) -> Tuple[bool, bool]:
        """(each expert's, the fused update's): the cosines the layer choice reads; only these
        are computed and stored."""
        return False, True

    # ---- threshold mode: the choice made in the merge, tensor by tensor

    @staticmethod
    def streaming(parameters: Dict[str, Any]) -> bool:
        """A threshold without a random control and without a given artifact file: each
        layer's choice needs only its own cosine, so it is made in the merge from the tensors
        mergekit already holds — no separate pass over the models and no artifact (top_k and
        the random control need every cosine first: they use the artifact)."""
        return (not int(parameters["top_k"]) and parameters["control"] == "none"
                and parameters.get("mask", AUTO) in (AUTO, ""))

    def wants_artifact(self, parameters: Dict[str, Any]) -> bool:
        return not self.streaming(parameters) and super().wants_artifact(parameters)

    def tensor_masks(self, inputs: TensorInputs, parameters: Dict[str, Any]) -> TensorMasks:
        if not (self.streaming(parameters) and inputs.has_models and self.can_locate(parameters)):
            return super().tensor_masks(inputs, parameters)
        from mergekit_safety.fusion.models import resolve_model

        base_dir = resolve_model(inputs.base_model)
        key = (base_dir, parameters["modules"])
        with self._tally_lock:
            names = self._candidates.get(key)
        if names is None:
            names = frozenset(candidate_names(base_dir, parameters["modules"]))
            with self._tally_lock:
                self._candidates[key] = names
        if inputs.name not in names:
            return TensorMasks()
        threshold = float(parameters["threshold"])
        tally = (base_dir, tuple(str(e) for e in inputs.expert_models), threshold, parameters["modules"])
        total = len(names) * self.tally_units(parameters, len(inputs.experts))
        return self.streaming_masks(inputs, parameters, self.projector(inputs, parameters), threshold,
                                    lambda acted: self._count(tally, total, acted, threshold))

    @staticmethod
    def projector(inputs: TensorInputs, parameters: Dict[str, Any]) -> "AlignmentProjector":
        """C for this tensor: V = θ_A − θ_U from the base and the unaligned model."""
        unaligned = model_tensor(parameters["unaligned_model"], inputs.name, inputs.base)
        return AlignmentProjector(inputs.base.float() - unaligned.float())

    def tally_units(self, parameters: Dict[str, Any], experts: int) -> int:
        """Decisions per candidate weight (each expert's update, or the fused one)."""
        return 1

    def streaming_masks(self, inputs: TensorInputs, parameters: Dict[str, Any], projector: "AlignmentProjector",
                        threshold: float, count: Callable[[bool], None]) -> TensorMasks:
        """The kernel slots that decide, per update, from its cosine (``count(acted)`` each time)."""
        raise NotImplementedError

    def _count(self, tally: tuple, total: int, acted: bool, threshold: float) -> None:
        """Counts the layers acted on; after the last candidate, says how many (and warns when
        the threshold took every one: the real testbed's LoRA updates did at 0.5)."""
        with self._tally_lock:
            seen, chosen = self._tallies.get(tally, (0, 0))
            seen, chosen = seen + 1, chosen + int(acted)
            if seen < total:
                self._tallies[tally] = (seen, chosen)
                return
            self._tallies.pop(tally, None)
        logger.info("%s: acted on %d of %d layer updates (threshold %s)", self.name, chosen, total, threshold)
        if chosen == total:
            logger.warning(
                "%s: threshold %s selects every one of the %d layer updates: the method acts everywhere, and its "
                "random control is the same merge; use top_k or a lower threshold to act on a part",
                self.name, threshold, total)

    def compute_artifact(self, request):
        from mergekit_safety.engine.calibration import SafetensorsSource
        from mergekit_safety.engine.vocabulary import aligned
        from mergekit_safety.fusion.models import resolve_model
        from mergekit_safety.fusion.sources import FusedSource

        p = request.parameters
        per_expert, of_fusion = self.cosine_sets(p)
        base_dir = resolve_model(request.base)
        base = SafetensorsSource(base_dir)
        unaligned = SafetensorsSource(resolve_model(p["unaligned_model"]))
        experts = [aligned(SafetensorsSource(resolve_model(e)), base) for e in request.experts]
        fused = FusedSource(base, experts, request.fuse_arguments(), seed=p.get("seed")) if of_fusion else None
        tensors: Dict[str, torch.Tensor] = {}
        names = candidate_names(base_dir, p["modules"])
        for name in names:
            theta_a = base.get(name).float()
            alignment = theta_a - unaligned.get(name).float()
            updates, keys = [], []
            if per_expert:
                for index, expert in enumerate(experts):
                    updates.append(expert.get(name).float() - theta_a)
                    keys.append(tensor_key(COSINE_ROLE, name, index))
            if of_fusion:
                updates.append(fused.get(name).float() - theta_a)
                keys.append(tensor_key(COSINE_ROLE, name))
            for key, cosine in zip(keys, projected_cosines(updates, alignment)):
                tensors[key] = torch.tensor([cosine], dtype=torch.float64)
            del updates
            for source in (base, unaligned, *experts):
                source.release()
        return tensors, {"tensors": len(names), "cosines": "+".join(
            k for k, on in (("experts", per_expert), ("fusion", of_fusion)) if on)}

    def cosines(self, artifact, expert: Optional[int]) -> Dict[str, float]:
        prefix = f"{COSINE_ROLE}/" if expert is None else f"{COSINE_ROLE}@{expert}/"
        return {key[len(prefix):]: float(artifact.get(key)[0]) for key in artifact.keys() if key.startswith(prefix)}

    def choices(self, artifact, parameters: Dict[str, Any], experts: int) -> Tuple[List[set], set]:
        """(layers acted on per expert, layers acted on for the fused update), cached; a set the
        method does not read is empty."""
        key = (artifact.path, id(artifact), parameters["threshold"], parameters["top_k"], parameters["control"],
               parameters["control_seed"], experts, self.cosine_sets(parameters))
        found = self._choices.get(key)
        if found is None:
            per_expert, of_fusion = self.cosine_sets(parameters)
            read = ([self.cosines(artifact, i) for i in range(experts)] if per_expert else []) + (
                [self.cosines(artifact, None)] if of_fusion else [])
            picked = [chosen_layers(c, float(parameters["threshold"]), int(parameters["top_k"]),
                                    parameters["control"], int(parameters["control_seed"])) for c in read]
            found = (picked[:experts] if per_expert else [set() for _ in range(experts)],
                     picked[-1] if of_fusion else set())
            self._choices[key] = found + (artifact,)  # holding the artifact keeps its id() unique
            total = max((len(c) for c in read), default=0)
            logger.info("%s: acting on %s of %d layers", self.name, [len(c) for c in picked], total)
            if total and any(len(c) == total for c in picked):
                # measured on the real testbed: LoRA updates' cosines were all below 0.44, so the
                # paper's 0.5 acted everywhere and the random control was the method itself
                logger.warning(
                    "%s: threshold %s selects every one of the %d layers (largest cosine %.3f): the method acts "
                    "everywhere, and its random control is the same merge; use top_k or a lower threshold "
                    "to act on a part", self.name, parameters["threshold"], total,
                    max(max(c.values(), default=0.0) for c in read))
        return found[0], found[1]


class SafeLoRA(ProjectionMethod):
    name = "safe_lora"
    pretty_name = "Safe LoRA: updates projected onto the alignment subspace where they stray from it"
    reference_url = "https://arxiv.org/abs/2405.16833"
    summary = (
        "Per layer, C = V Vᵀ/‖V‖_F with V = θ_A − θ_U; where an update's projected cosine is below "
        "a threshold (or among the k lowest), it is replaced by C·ΔW — per expert or on the fusion; data-free."
    )
    settings = SafeLoRASettings

    def cosine_sets(self, parameters: Dict[str, Any]) -> Tuple[bool, bool]:
        experts = parameters.get("apply_to", "experts") == "experts"
        return experts, not experts

    def tally_units(self, parameters: Dict[str, Any], experts: int) -> int:
        return experts if parameters["apply_to"] == "experts" else 1

    def streaming_masks(self, inputs, parameters, projector, threshold, count) -> TensorMasks:
        def project(update: torch.Tensor) -> torch.Tensor:
            image, cosine = projector.image_and_cosine(update)
            count(cosine < threshold)
            return image.to(update.dtype) if cosine < threshold else update

        if parameters["apply_to"] == "experts":
            return TensorMasks(expert_project=[project] * len(inputs.experts))
        return TensorMasks(project=project)

    def masks_from_artifact(self, artifact, inputs: TensorInputs, parameters: Dict[str, Any]) -> TensorMasks:
        per_expert, fusion = self.choices(artifact, parameters, len(inputs.experts))
        name = inputs.name
        acting = [name in chosen for chosen in per_expert] if parameters["apply_to"] == "experts" else [name in fusion]
        if not any(acting):
            return TensorMasks()
        projector = self.projector(inputs, parameters)

        def project(update: torch.Tensor) -> torch.Tensor:
            return projector(update).to(update.dtype)

        if parameters["apply_to"] == "experts":
            positions = [self.expert_position(artifact, inputs, i) for i in range(len(inputs.experts))]
            return TensorMasks(expert_project=[project if name in per_expert[p] else None for p in positions])
        return TensorMasks(project=project)

"""A method's settings: the single declaration of its YAML parameters.

Every method declares one pydantic model, a subclass of :class:`FusionSettings`. Each field is
one YAML parameter, declared with :func:`setting`: its type and range (pydantic constraints),
default, meaning, and its role. Everything else is derived from it:

* the mergekit parameter list of the method (:mod:`mergekit_safety.plugin.adapter`), hence
  ``mergekit-safety methods`` and the ranges ``mergekit-safety check`` enforces;
* the locate fingerprint: the fields whose values are recorded in an artifact, so that
  changing one makes the artifact stale (:meth:`FusionSettings.locate_fields`), the data files
  whose sha256 is recorded (``data=True``), the further model references that are
  fingerprinted like the base model and the experts (``model=True``);
* CLI options that expose settings (``mergekit-safety inspect``).

Roles of a field:

* plain — read by the merge kernel per tensor; does not change an artifact;
* ``locate=True`` — changes what the locate step computes (recorded in the artifact);
* ``data=True`` — a data file the locate step reads (its path and sha256 are recorded);
  ``keys=(...)`` names the JSONL keys its records need (``check`` reads the file with them);
* ``model=True`` — a further model reference (e.g. an unaligned model), fingerprinted;
* ``fusion=True`` — a setting of the fusion backbone; recorded when the method's artifact
  depends on the fusion (:attr:`FusionSettings.artifact_depends_on_fusion`);
* ``per_model=True`` — a value per expert (``models: - parameters:``), not global.

Shared keys have one meaning everywhere: ``modules`` is :mod:`mergekit_safety.engine.modules`'s
grammar; ``batch_size`` is examples per forward pass — for calibration it does not change the
result (not recorded); for SOMF every forward pass is one optimisation step, so it does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Literal, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Annotated

UnitInterval = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
#: a torch device name; whether it exists on the machine is checked where it is used
DeviceName = Annotated[str, Field(pattern=r"^(cpu|cuda|mps|xpu|hpu|npu)(:[0-9]+)?$")]

BACKBONE_NAMES = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "mean")
DARE_BACKBONES = ("dare_linear", "dare_ties")
AUTO = "auto"


def setting(
    default: Any,
    description: str,
    *,
    locate: bool = False,
    data: bool = False,
    model: bool = False,
    fusion: bool = False,
    per_model: bool = False,
    internal: bool = False,
    keys: Tuple[str, ...] = (),
    auto_from: str = "",
    alias: Optional[str] = None,
    **constraints: Any,
):
    """A settings field: one YAML parameter (see the module docstring for the roles).
    ``internal=True``: not a YAML parameter (filled by the method, e.g. from per-model values).
    ``keys``: for a data file, the JSONL keys every record must have (non-empty strings);
    ``auto_from``: the parameter naming what an ``auto`` value of this data file is built from."""
    extra = {
        "locate": locate or data or model, "data": data, "model": model, "fusion": fusion,
        "per_model": per_model, "internal": internal, "keys": list(keys),
        "auto_from": auto_from,
    }
    return Field(default, description=description, alias=alias, json_schema_extra=extra, **constraints)


@dataclass(frozen=True)
class Parameter:
    """One YAML parameter as derived from a settings field."""

    name: str  # as written in YAML (the field's alias, if any)
    field: str  # the pydantic field name
    value_type: Any  # the annotation with its constraints (Annotated[...] when constrained)
    default: Any
    description: str
    per_model: bool
    locate: bool
    data: bool
    model: bool
    fusion: bool
    keys: Tuple[str, ...] = ()  # JSONL keys of a data file
    auto_from: str = ""  # for a data file that may be 'auto': the parameter it is built from


class DeclaredSettings(BaseModel):
    """A group of parameters declared with :func:`setting` (derivations below)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @classmethod
    def parameters(cls) -> Tuple[Parameter, ...]:
        """Every YAML parameter: global ones in declaration order, then per-model ones."""
        found = []
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra or {}
            if extra.get("internal"):
                continue
            value_type = info.annotation
            if info.metadata:
                value_type = Annotated[tuple([value_type, *info.metadata])]
            found.append(
                Parameter(
                    name=info.alias or name,
                    field=name,
                    value_type=value_type,
                    default=info.default,
                    description=(info.description or "") + (cls.preset_note(info.alias or name) if hasattr(cls, "preset_note") else ""),
                    per_model=bool(extra.get("per_model")),
                    locate=bool(extra.get("locate")),
                    data=bool(extra.get("data")),
                    model=bool(extra.get("model")),
                    fusion=bool(extra.get("fusion")),
                    keys=tuple(extra.get("keys") or ()),
                    auto_from=extra.get("auto_from") or "",
                )
            )
        return tuple([p for p in found if not p.per_model] + [p for p in found if p.per_model])

    @classmethod
    def parameter(cls, name: str) -> Parameter:
        for parameter in cls.parameters():
            if parameter.name == name:
                return parameter
        raise KeyError(f"{cls.__name__} has no parameter {name!r}")


class FusionSettings(DeclaredSettings):
    """Parameters of every method: the fusion backbone and an optional mask artifact.

    Presets: a method may declare ``PRESETS = {name: {parameter: value}}`` and a ``preset``
    field. A preset-controlled parameter is declared with default None ("from the preset");
    :meth:`resolve` fills every None from the chosen preset, so an explicit value always wins
    and the paper's exact setting stays one parameter away (``preset: paper``).
    """

    #: preset name → {parameter (YAML name): value}
    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if cls.PRESETS and isinstance(data, dict):
            return cls.resolve(data)
        return data

    #: whether the artifact depends on the fusion (its backbone settings and per-model
    #: weights/densities are then recorded in it, e.g. SOMF trains through the fusion)
    artifact_depends_on_fusion: ClassVar[bool] = False

    mask: str = setting(
        "",
        "path of a mask artifact (safetensors, roles keep/post_keep/zero); empty = keep all. "
        "Relative paths resolve from the working directory.",
    )
    backbone: Literal[BACKBONE_NAMES] = setting(
        "task_arithmetic",
        "how the masked task vectors are combined: task_arithmetic, ties, dare_linear, "
        "dare_ties or mean (mergekit's own code)",
        fusion=True,
    )
    lambda_: float = setting(1.0, "scale of the fused task vector", alias="lambda", fusion=True)
    normalize: Optional[bool] = setting(
        None, "divide by the sum of weights (default: the backbone's mergekit default)", fusion=True
    )
    rescale: Optional[bool] = setting(
        None, "rescale sparsified task vectors to their L1 norm (default: as mergekit)", fusion=True
    )
    int8_mask: bool = setting(False, "store the TIES sign mask as int8")
    ties_selection: Literal["mergekit", "fast"] = setting(
        "mergekit",
        "TIES top-k selection: mergekit (its argsort: bit-identical to mergekit's ties) or fast "
        "(a histogram of the magnitudes' bits and the sign election on sign bits, about 4x faster; "
        "differs only in which of several equal magnitudes at the threshold are kept)",
        fusion=True,
    )
    seed: Optional[int] = setting(
        None, "seed for DARE's random drop (per tensor); empty = torch's global RNG", fusion=True
    )
    weight: float = setting(1.0, "per-model weight of the task vector", per_model=True, fusion=True)
    density: UnitInterval = setting(
        1.0, "per-model share of the task vector TIES/DARE keep", per_model=True, fusion=True
    )

    # ---- derived declarations

    @classmethod
    def locate_fields(cls) -> Tuple[str, ...]:
        """Global parameters recorded in an artifact (a change makes it stale)."""
        return tuple(
            p.name for p in cls.parameters()
            if not p.per_model and (p.locate or (p.fusion and cls.artifact_depends_on_fusion))
        )

    @classmethod
    def expert_locate_fields(cls) -> Tuple[str, ...]:
        """Per-model parameters recorded in an artifact."""
        return tuple(
            p.name for p in cls.parameters()
            if p.per_model and (p.locate or (p.fusion and cls.artifact_depends_on_fusion))
        )

    @classmethod
    def data_fields(cls) -> Tuple[str, ...]:
        return tuple(p.name for p in cls.parameters() if p.data)

    @classmethod
    def model_fields_(cls) -> Tuple[str, ...]:
        """Parameters naming further models (fingerprinted like the base model)."""
        return tuple(p.name for p in cls.parameters() if p.model)

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """Global parameter name → default."""
        return {p.name: p.default for p in cls.parameters() if not p.per_model}

    @classmethod
    def resolve(cls, values: Dict[str, Any]) -> Dict[str, Any]:
        """``values`` (by YAML name) with every None of a preset-controlled parameter filled
        from the chosen preset (``values['preset']``, else the field's default)."""
        if not cls.PRESETS:
            return dict(values)
        name = values.get("preset") or cls.model_fields["preset"].default
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r} (one of {sorted(cls.PRESETS)})")
        out = dict(values)
        for key, value in cls.PRESETS[name].items():
            if out.get(key) is None:
                out[key] = value
        return out

    @classmethod
    def preset_note(cls, name: str) -> str:
        """' (recipe: 1.0, paper: 0.0)' for a preset-controlled parameter, else ''."""
        values = [f"{preset}: {table[name]!r}" for preset, table in cls.PRESETS.items() if name in table]
        return f" — empty = the preset's ({', '.join(values)})" if values else ""

    @classmethod
    def from_parameters(cls, values: Dict[str, Any]) -> "FusionSettings":
        """Validated settings from global YAML values (per-model ones are left out)."""
        known = {p.name for p in cls.parameters() if not p.per_model}
        return cls.model_validate({k: v for k, v in values.items() if k in known})


def parse_assignments(text: str) -> Dict[str, Any]:
    """``"a=1,b=0.5,c=on"`` → ``{"a": 1, "b": 0.5, "c": True}``: the one parser of the
    ``key=value,...`` lists given on command lines (the testbed's SOMF settings and variants,
    the protocol's recipe). Numbers as numbers (``1e-3`` too), then YAML scalars (booleans,
    null), else the text."""
    import yaml

    out: Dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"{item!r}: expected NAME=VALUE")
        for kind in (int, float):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[key] = yaml.safe_load(value) if value else ""
    return out


def subset(settings_class, names: List[str]):
    """The parameters of ``settings_class`` named ``names`` (e.g. to derive CLI options)."""
    return [settings_class.parameter(name) for name in names]


class LocatingSettings(FusionSettings):
    """Parameters of a method whose artifact is computed from its YAML's models and data."""

    mask: str = setting(
        AUTO,
        "artifact path, or 'auto' (default: content-addressed file in the cache); computed "
        "from the models and data on first use if missing, refused if stale",
    )

"""mergekit parameter specs derived from a method's settings (their single declaration)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mergekit.merge_methods.base import ParameterScope, ParameterSpec


@dataclass(frozen=True)
class NamedParameterSpec(ParameterSpec):
    """A ParameterSpec whose validation errors name the YAML parameter and the value."""

    def validate(self, value: Any) -> Any:
        from pydantic import ValidationError

        try:
            return super().validate(value)
        except ValidationError as error:
            reasons = "; ".join(item["msg"] for item in error.errors())
            raise ValueError(f"merge parameter {self.name!r}: invalid value {value!r} ({reasons})") from None


def parameter_specs(settings) -> tuple:
    """mergekit parameter specs derived from a settings class (its field order)."""
    return tuple(
        NamedParameterSpec(
            p.name,
            p.value_type,
            ParameterScope.NON_BASE if p.per_model else ParameterScope.SHARED,
            default=p.default,
            description=p.description,
        )
        for p in settings.parameters()
    )

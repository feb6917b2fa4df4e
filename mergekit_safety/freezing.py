"""Kept for ``import mergekit_safety.freezing``: freezing lives in
:mod:`mergekit_safety.methods.ssah.freezing` (the lab's freezing experiment in
:mod:`mergekit_safety.lab.freezing_experiment`)."""

from mergekit_safety.methods.ssah.freezing import FrozenUnits, freeze_units, train_only_budget

__all__ = ["FrozenUnits", "freeze_units", "train_only_budget"]

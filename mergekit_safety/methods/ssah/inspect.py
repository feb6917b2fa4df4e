"""``mergekit-safety inspect``: where safety lives in an SSAH artifact (report and heat map)."""

from __future__ import annotations

import os
from typing import Optional

import torch

from mergekit_safety.methods.ssah.method import (
    ESU,
    LABEL_NAMES,
    RU,
    ProtectSettings,
    UnitScores,
    load_unit_scores,
)
from mergekit_safety.methods.ssah.units import UnitSet, layout_parameter_count, unit_parameter_count


def inspect_artifact(
    path: str,
    png: Optional[str] = None,
    settings: ProtectSettings = ProtectSettings(),
) -> str:
    """A per-layer report of an SSAH artifact (label shares of heads and neurons, protected
    counts); with ``png``, also a heat map of where safety lives (layer × unit type)."""
    scores = load_unit_scores(path)
    layout = scores.layout
    protected = scores.protected(settings)
    lines = [
        f"SSAH artifact {path}",
        f"layout: {layout.num_layers} layers, {layout.num_heads} heads "
        f"({layout.num_kv_heads} K/V heads), {layout.intermediate_size} neurons per layer; "
        f"{layout.total_units} units",
        "labels overall: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in scores.label_shares().items()),
        f"protected (share {settings.protect_share}, control {settings.control}, kv_policy "
        f"{settings.kv_policy}): {protected.count()} units = {int(protected.heads.sum())} heads + "
        f"{int(protected.neurons.sum())} neurons; "
        f"{100 * unit_parameter_count(protected, layout, settings.kv_policy) / layout_parameter_count(layout):.2f}% "
        "of unit weights",
        "",
        f"{'layer':>5} {'type':<7} " + " ".join(f"{n:>6}" for n in LABEL_NAMES.values())
        + f" {'protect':>8} {'top Diff':>9}",
    ]
    for layer in range(layout.num_layers):
        # scores are z-scored within each layer, so their layer mean is 0 by construction; the
        # layer's largest Diff = z_safety − z_utility says how safety-specific its top unit is
        for kind, labels, chosen, safety in (
            ("heads", scores.label_heads[layer], protected.heads[layer],
             scores.safety_heads[layer] - scores.utility_heads[layer]),
            ("neurons", scores.label_neurons[layer], protected.neurons[layer],
             scores.safety_neurons[layer] - scores.utility_neurons[layer]),
        ):
            shares = " ".join(
                f"{100 * float((labels == code).float().mean()):5.1f}%" for code in LABEL_NAMES
            )
            lines.append(
                f"{layer:>5} {kind:<7} {shares} {100 * float(chosen.float().mean()):7.1f}% "
                f"{float(safety.float().max()):9.3f}"
            )
    if png:
        write_heatmap(scores, protected, png)
        lines.append("")
        lines.append(f"heat map written to {png}")
    return "\n".join(lines)


def write_heatmap(scores: UnitScores, protected: UnitSet, png: str) -> None:
    """PNG. Top row, per layer × unit type: ESU share, protected share, RU share (the
    alignment budget). Bottom row: Diff = z_safety − z_utility of every head and every neuron
    (layer × unit index), protected units outlined / dotted."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the heat map needs matplotlib: pip install 'mergekit-safety[lab]' (or use --no-png)"
        ) from None

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    layout = scores.layout
    kinds = ["attention heads", "MLP neurons"]

    def share(label: int) -> torch.Tensor:
        return 100 * torch.stack([
            (scores.label_heads == label).float().mean(dim=1), (scores.label_neurons == label).float().mean(dim=1)
        ], dim=1)

    prot = 100 * torch.stack([protected.heads.float().mean(dim=1), protected.neurons.float().mean(dim=1)], dim=1)
    panels = [("ESU share (%)", share(ESU)), ("protected share (%)", prot), ("RU share (%, alignment budget)", share(RU))]
    height = max(2.2, 0.3 * layout.num_layers + 1.4)
    figure = plt.figure(figsize=(13, 2 * height + 0.8))
    grid = figure.add_gridspec(2, 6)
    for position, (title, values) in enumerate(panels):
        axis = figure.add_subplot(grid[0, 2 * position:2 * position + 2])
        data = values.numpy()
        image = axis.imshow(data, aspect="auto", cmap="Reds", origin="lower", vmin=0)
        axis.set_xticks(range(len(kinds)))
        axis.set_xticklabels(kinds)
        axis.set_yticks(range(layout.num_layers))
        axis.set_ylabel("layer")
        axis.set_title(title, fontsize=10)
        top = float(data.max()) or 1.0
        if layout.num_layers <= 40:
            for row in range(data.shape[0]):
                for col in range(data.shape[1]):
                    axis.text(col, row, f"{data[row, col]:.1f}", ha="center", va="center", fontsize=8,
                              color="white" if data[row, col] > 0.6 * top else "black")
        figure.colorbar(image, ax=axis, fraction=0.046)
    for position, (title, diff, chosen) in enumerate((
        ("heads: Diff (protected marked)", scores.safety_heads - scores.utility_heads, protected.heads),
        ("neurons: Diff (protected marked)", scores.safety_neurons - scores.utility_neurons, protected.neurons),
    )):
        axis = figure.add_subplot(grid[1, :2] if position == 0 else grid[1, 2:])
        data = diff.float().numpy()
        bound = float(max(abs(data.min()), abs(data.max()), 1e-6))
        image = axis.imshow(data, aspect="auto", cmap="coolwarm", origin="lower", vmin=-bound, vmax=bound,
                            interpolation="nearest")
        rows, cols = chosen.nonzero(as_tuple=True)
        axis.scatter(cols.numpy(), rows.numpy(), s=12 if position else 60, facecolors="none", edgecolors="black",
                     linewidths=0.8)
        axis.set_xlabel("head" if position == 0 else "neuron")
        axis.set_ylabel("layer")
        axis.set_yticks(range(layout.num_layers))
        axis.set_title(title, fontsize=10)
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.suptitle("SSAH: where safety lives (layer × unit type)")
    figure.tight_layout()
    folder = os.path.dirname(os.path.abspath(png))
    os.makedirs(folder, exist_ok=True)
    figure.savefig(png, dpi=110)
    plt.close(figure)

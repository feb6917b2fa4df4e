"""The safety section of the merged model's card (``README.md``), following the Hugging Face
model-card conventions: front-matter tags and a section saying how the merge was made safe.

Written by the plugin hook right after mergekit's ``run_merge`` wrote its own card (entry point
group ``mergekit.post_merge``), for this package's methods only: the method and its paper, the
settings, and — for methods with an artifact — the fingerprints it records (models, data
sha256, settings). ``mergekit-safety eval OUT --card`` adds the measured refusal and
over-refusal rates with their intervals and the judge's known accuracy. Nothing is claimed that
was not measured: until ``eval --card`` ran, the section says safety was not measured.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional

START, END = "<!-- mergekit-safety:start -->", "<!-- mergekit-safety:end -->"
MEASURED_START, MEASURED_END = "<!-- mergekit-safety:measured:start -->", "<!-- mergekit-safety:measured:end -->"
NOT_MEASURED = ("Safety of this merged model has **not been measured**. Run "
                "`mergekit-safety eval <this folder> --card` to add measured refusal rates here.")


def _front_matter(text: str) -> tuple:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    if not match:
        return {}, text
    import yaml

    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return {}, text
    return data, text[match.end():]


def _with_front_matter(data: Dict[str, Any], body: str) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(data, sort_keys=False).strip() + "\n---\n" + body


def _replace_block(text: str, start: str, end: str, block: str) -> str:
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text)
    return text.rstrip() + "\n\n" + block + "\n"


def safety_section(method, config_raw: Dict[str, Any], record: Optional[Any]) -> str:
    """The markdown of the safety section (without the measured block)."""
    lines = [START, "## Safety restoration (mergekit-safety)", ""]
    paper = f" ([paper]({method.reference_url}))" if method.reference_url else ""
    lines.append(f"This merge used **`{method.name}`** — {method.pretty_name}{paper}: {method.summary}")
    lines.append("")
    parameters = config_raw.get("parameters") or {}
    if parameters:
        lines.append("Settings written in the merge configuration: " + ", ".join(
            f"`{k}: {v}`" for k, v in sorted(parameters.items())) + ".")
        lines.append("")
    if record is not None:
        lines.append("Computed from (artifact fingerprints):")
        lines.append("")
        if record.base is not None:
            lines.append(f"* base model `{record.base.ref}` — fingerprint `{record.base.fingerprint}`")
        for expert in record.experts:
            lines.append(f"* expert `{expert.ref}` — fingerprint `{expert.fingerprint}`")
        for name, model in sorted(record.models.items()):
            lines.append(f"* {name} `{model.ref}` — fingerprint `{model.fingerprint}`")
        for name, digest in sorted(record.data.items()):
            lines.append(f"* data `{name}` — sha256 `{digest}`")
        if record.settings:
            lines.append("* settings: " + ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in sorted(record.settings.items())
                                                   if k != "experts"))
        lines.append("")
    else:
        from mergekit_safety.fusion.artifacts import model_fingerprint

        references = [("base model", config_raw.get("base_model"))] + [
            ("model", m.get("model")) for m in config_raw.get("models") or [] if m.get("model") != config_raw.get("base_model")
        ] + [(name, parameters.get(name)) for name in method.settings.model_fields_() if parameters.get(name)]
        lines.append("Models (fingerprints: safetensors headers and content samples):")
        lines.append("")
        for role, reference in references:
            if reference:
                lines.append(f"* {role} `{reference}` — fingerprint `{model_fingerprint(reference)}`")
        lines.append("")
    lines += [MEASURED_START, NOT_MEASURED, MEASURED_END, END]
    return "\n".join(lines)


def _record(method, config_raw: Dict[str, Any]):
    """The artifact metadata a locating method used for this config (None if none)."""
    from mergekit_safety.fusion.artifacts import ArtifactError, open_artifact
    from mergekit_safety.fusion.locate import Locator
    from mergekit_safety.plugin.config import request_from_config_data

    if not isinstance(method, Locator):
        return None
    try:
        _, request = request_from_config_data(config_raw)
        if not method.can_locate({**method.settings.defaults(), **request.parameters}) and request.parameters.get("mask") in ("", "auto"):
            return None
        path = method.artifact_path(request)
        return open_artifact(path).metadata if os.path.exists(path) else None
    except (ArtifactError, ValueError, KeyError):
        return None


def post_merge_card(config, out_path: str, options=None) -> None:
    """Add the safety section and tags to the card mergekit wrote (our methods only)."""
    from mergekit import merge_methods

    from mergekit_safety.plugin.config import package_method

    card = os.path.join(out_path, "README.md")
    if options is not None and not getattr(options, "write_model_card", True):
        return
    try:
        method = package_method(merge_methods.get(config.merge_method))
    except RuntimeError:
        return
    if method is None or not os.path.isfile(card):
        return
    from mergekit_safety.plugin.checks import config_as_raw

    raw = config_as_raw(config)
    with open(card, "r", encoding="utf-8") as handle:
        text = handle.read()
    meta, body = _front_matter(text)
    tags: List[str] = list(meta.get("tags") or [])
    for tag in ("mergekit-safety", "safety", method.name):
        if tag not in tags:
            tags.append(tag)
    meta["tags"] = tags
    body = _replace_block(body, START, END, safety_section(method, raw, _record(method, raw)))
    _write(card, _with_front_matter(meta, body))


def add_measurements(model_dir: str, result: Dict[str, Any]) -> str:
    """Write an ``eval`` result into the card's measured block (creating a safety section when
    the card has none). Returns the card's path."""
    from mergekit_safety.judge import KNOWN_AGREEMENT

    card = os.path.join(model_dir, "README.md")
    text = open(card, encoding="utf-8").read() if os.path.isfile(card) else ""
    meta, body = _front_matter(text)
    if START not in body:
        body = _replace_block(body, START, END, "\n".join([START, "## Safety (mergekit-safety)", "",
                                                            MEASURED_START, NOT_MEASURED, MEASURED_END, END]))

    def pct(value, interval):
        return f"{100 * value:.1f} % (95 % CI {100 * interval[0]:.1f}–{100 * interval[1]:.1f} %)"

    judge = result.get("judge", "keyword")
    lines = [MEASURED_START, "### Measured with `mergekit-safety eval`", ""]
    lines.append(f"* refusal of harmful prompts: {pct(result['refusal_rate'], result['refusal_interval'])}, "
                 f"n = {result['n_harmful']}")
    lines.append(f"* over-refusal of benign prompts: {pct(result['over_refusal_rate'], result['over_refusal_interval'])}, "
                 f"n = {result['n_benign']}")
    for skill, accuracy in sorted((result.get("accuracy") or {}).items()):
        interval = (result.get("accuracy_interval") or {}).get(skill)
        lines.append(f"* accuracy `{skill}`: " + (pct(accuracy, interval) if interval else f"{100 * accuracy:.1f} %")
                     + (f", n = {result['accuracy_n'][skill]}" if skill in (result.get("accuracy_n") or {}) else ""))
    known = KNOWN_AGREEMENT.get(judge)
    lines.append(f"* judge: `{judge}`" + (f" — {known}" if known else " — accuracy not measured by this package"))
    lines.append(f"* greedy decoding, {result.get('max_new_tokens')} new tokens, dtype {result.get('dtype', 'float32')}")
    lines.append(MEASURED_END)
    body = _replace_block(body, MEASURED_START, MEASURED_END, "\n".join(lines))
    _write(card, _with_front_matter(meta, body) if meta else body)
    return card


def _write(path: str, text: str) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)

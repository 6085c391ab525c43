"""Profiles and overrides: every stage's params at once (params/profiles/<name>.yaml over the typed
models' defaults), one-off `stage.key=value` overrides, and writing params/*.yaml."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from tasks.params import PARAMS_DIR, STAGE_PARAMS, ParamsError, params_path, read_yaml, validate

PROFILES_DIR = PARAMS_DIR / "profiles"


def profile_names() -> list[str]:
    return ["default"] + sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _merge(base: dict, overlay: dict) -> dict:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def profile_params(name: str) -> dict[str, dict]:
    """Every stage's full params under a profile: the model defaults, overlaid by the profile file."""
    if name not in profile_names():
        raise ParamsError(f"unknown profile '{name}'; profiles: {', '.join(profile_names())}")
    overlay = {} if name == "default" else read_yaml(PROFILES_DIR / f"{name}.yaml")
    unknown = set(overlay) - set(STAGE_PARAMS)
    if unknown:
        raise ParamsError(
            f"{PROFILES_DIR / name}.yaml: unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGE_PARAMS)}"
        )
    full = {}
    for stage, model in STAGE_PARAMS.items():
        data = _merge(model().model_dump(mode="json"), overlay.get(stage, {}))
        full[stage] = validate(stage, data, PROFILES_DIR / f"{name}.yaml").model_dump(mode="json")
    return full


def parse_value(raw: str, override: str = "") -> object:
    """A command-line value typed as YAML would, plus the `1e-3` floats YAML 1.1 reads as text."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamsError(f"override '{override or raw}': the value {raw!r} is not valid YAML ({problem})") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_overrides(full: dict[str, dict], overrides: list[str]) -> dict[str, dict]:
    """Apply overrides (YAML-typed values) to a full params mapping: `stage.key.sub=value`, or
    DVC's `-S` form `params/stage.yaml:key.sub=value`."""
    full, touched = copy.deepcopy(full), {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if ":" in key:
            path, _, dotted = key.partition(":")
            stage = Path(path).stem
        else:
            stage, _, dotted = key.partition(".")
        if not sep or not dotted or stage not in full:
            raise ParamsError(
                f"override '{override}': expected stage.key=value or params/<stage>.yaml:key=value "
                f"with stage in {', '.join(full)}"
            )
        node = full[stage]
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                section = ".".join([stage, *parents[: depth + 1]])
                raise ParamsError(f"override '{override}': {section} is a value ({node!r}), not a section with keys")
        node[leaf] = parse_value(raw, override)
        touched.setdefault(stage, []).append(override)
    for stage, made in touched.items():  # once all are set, so that their order does not matter
        validate(stage, full[stage], Path(f"override{'s' * (len(made) > 1)} {', '.join(map(repr, made))}"))
    return full


def write_params(full: dict[str, dict]) -> list[str]:
    """Write params/<stage>.yaml for every stage; return the stages whose file changed."""
    changed = []
    for stage, values in full.items():
        path = params_path(stage)
        text = yaml.safe_dump(values, sort_keys=False, default_flow_style=None)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(stage)
    return changed

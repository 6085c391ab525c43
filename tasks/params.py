"""Typed stage parameters: one YAML file per stage under params/, validated before any work.

Each stage's file validates into the model registered for it in STAGE_PARAMS. The defaults
of those models are the `default` profile; params/profiles/<name>.yaml overlays them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.errors import StageError

PARAMS_DIR = Path("params")
PROFILES_DIR = PARAMS_DIR / "profiles"


class ParamsError(StageError, ValueError):
    """A params file that does not validate; the message names the file, key, value and what is allowed."""


class Strict(BaseModel):
    """Unknown keys are refused, values are never coerced silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainParams(Strict):
    """The training loop's knobs, shared by every training stage."""

    epochs: float = Field(10.0, gt=0, description="passes over the training split")
    batch_size: int = Field(128, ge=2, le=65536, description="global batch, split over ranks")
    optimizer: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD/LARS momentum")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of steps with linear warmup")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a share of lr")
    grad_clip: float | None = Field(1.0, gt=0, description="max grad norm; null turns clipping off")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the weights; null for none")
    checkpoint_every: int = Field(500, ge=1, description="steps between resumable saves")
    log_every: int = Field(10, ge=1, description="steps between metric logs")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on CUDA")
    compile: bool = Field(False, description="torch.compile the trained module")


Source = Literal["digits", "mnist", "fashion_mnist", "cifar10", "folder"]


class PrepareParams(Strict):
    """Raw dataset -> uint8 train/val/test splits."""

    source: Source = "digits"
    root: str | None = Field(None, description="raw files; default data/raw/<source>")
    download: bool = Field(True, description="fetch missing files from the canonical mirrors")
    image_size: int = Field(16, ge=4, le=512)
    fit: Literal["resize", "pad"] = Field("resize", description="how images reach image_size")
    channels: Literal[1, 3] | None = Field(None, description="null keeps the source's")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    official_test: bool = Field(True, description="use the source's own test split when it has one")
    limit_per_class: int | None = Field(None, ge=3, description="keep at most this many per class")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> PrepareParams:
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must stay below 0.8")
        return self


STAGE_PARAMS: dict[str, type[Strict]] = {
    "prepare": PrepareParams,
}


def params_path(stage: str) -> Path:
    return PARAMS_DIR / f"{stage}.yaml"


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def _allowed(model: type[BaseModel], loc: tuple) -> str:
    """The keys allowed at the parent of `loc`, for 'unknown key' messages."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    return ", ".join(model.model_fields)


def describe_errors(path: Path, model: type[BaseModel], err: ValidationError) -> str:
    """One line per problem: file, dotted key, bad value, what is allowed."""
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"])
        value = problem.get("input")
        if not key:  # a rule across several keys
            lines.append(f"{path}: {problem['msg'].removeprefix('Value error, ')}")
        elif problem["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key '{key}'; allowed keys: {_allowed(model, problem['loc'])}")
        else:
            lines.append(f"{path}: key '{key}' = {value!r} is invalid: {problem['msg']}")
    return "\n".join(lines)


def validate(stage: str, data: dict, path: Path | None = None) -> Strict:
    """Validate a stage's raw mapping into its typed model, or raise ParamsError."""
    if stage not in STAGE_PARAMS:
        raise ParamsError(f"unknown stage '{stage}'; stages: {', '.join(STAGE_PARAMS)}")
    model = STAGE_PARAMS[stage]
    path = path or params_path(stage)
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as err:
        raise ParamsError(describe_errors(path, model, err)) from None


def load_params(stage: str) -> Strict:
    """Read and validate params/<stage>.yaml."""
    path = params_path(stage)
    return validate(stage, _read_yaml(path), path)


def flatten(params: BaseModel, prefix: str) -> dict[str, object]:
    """`{prefix.key.sub: value}` for tracking."""
    out: dict[str, object] = {}

    def walk(node: object, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}")
        else:
            out[key] = node

    walk(params.model_dump(mode="json"), prefix)
    return out


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
    overlay = {} if name == "default" else _read_yaml(PROFILES_DIR / f"{name}.yaml")
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


def parse_value(raw: str) -> object:
    """A command-line value typed as YAML would, plus the `1e-3` floats YAML 1.1 reads as text."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_overrides(full: dict[str, dict], overrides: list[str]) -> dict[str, dict]:
    """Apply `stage.key.sub=value` overrides (YAML-typed values) to a full params mapping."""
    full = {stage: dict(values) for stage, values in full.items()}
    for override in overrides:
        key, sep, raw = override.partition("=")
        stage, _, dotted = key.partition(".")
        if not sep or not dotted or stage not in full:
            raise ParamsError(f"override '{override}': expected stage.key=value with stage in {', '.join(full)}")
        node = full[stage]
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(raw)
        validate(stage, full[stage], Path(f"override '{override}'"))
    return full


def write_params(full: dict[str, dict]) -> list[str]:
    """Write params/<stage>.yaml for every stage; return the stages whose file changed."""
    changed = []
    for stage, values in full.items():
        path = params_path(stage)
        text = yaml.safe_dump(values, sort_keys=False)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(stage)
    return changed

"""Params files: every kind of bad value is refused with a message naming file, key and value."""

import sys

import pytest
import yaml
from pydantic import ValidationError

from runtime.profiles import profile_names, profile_params
from tasks.params import STAGE_PARAMS, ParamsError, load_params, validate
from tests.conftest import REPO, run


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"colour": 3}, ["unknown key 'colour'", "allowed keys:", "image_size"]),
        ({"image_size": "big"}, ["key 'image_size' = 'big'", "valid integer"]),
        ({"image_size": 2}, ["key 'image_size' = 2", "greater than or equal to 4"]),
        ({"source": "imagenet"}, ["key 'source' = 'imagenet'", "'digits'", "'cifar10'", "'folder'"]),
        ({"val_fraction": 0.45, "test_fraction": 0.4}, ["val_fraction + test_fraction must stay below 0.8"]),
        ({"download": "yes please"}, ["key 'download'", "valid boolean"]),
    ],
)
def test_bad_prepare_values_are_refused_with_file_key_and_value(bad, expected):
    with pytest.raises(ParamsError) as caught:
        validate("prepare", bad)
    message = str(caught.value)
    assert "params/prepare.yaml" in message
    for fragment in expected:
        assert fragment in message


def test_float_field_takes_an_int_but_not_text():
    from tasks.params import TrainParams

    assert TrainParams.model_validate({"epochs": 3}, strict=True).epochs == 3.0
    with pytest.raises(ValidationError):
        TrainParams.model_validate({"epochs": "3"}, strict=True)


def test_every_profile_validates_for_every_stage():
    for name in profile_names():
        full = profile_params(name)
        assert set(full) == set(STAGE_PARAMS)
        for stage, values in full.items():
            validate(stage, values)


def test_committed_params_are_the_default_profile():
    """params/*.yaml in git is what `python -m flows profile default` writes."""
    for stage, values in profile_params("default").items():
        assert yaml.safe_load((REPO / "params" / f"{stage}.yaml").read_text()) == values, stage


@pytest.mark.slow  # a stage process
def test_a_bad_params_file_stops_the_stage_before_any_work(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "prepare.yaml").write_text("source: digits\nimage_size: -1\nextra: 1\n")
    done = run([sys.executable, "-m", "flows.prepare"], tmp_path, check=False)
    assert done.returncode == 2
    assert "params/prepare.yaml: key 'image_size' = -1" in done.stderr
    assert "unknown key 'extra'" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params"]  # nothing written


def test_load_params_reports_a_missing_file(in_tmp):
    with pytest.raises(ParamsError, match="params/prepare.yaml: file not found"):
        load_params("prepare")


def test_profile_command_writes_params_and_refuses_bad_overrides(tmp_path):
    (tmp_path / "params" / "profiles").mkdir(parents=True)
    (tmp_path / "params" / "profiles" / "smoke.yaml").write_text((REPO / "params/profiles/smoke.yaml").read_text())
    done = run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "prepare.seed=7"], tmp_path)
    assert "wrote" in done.stdout
    written = yaml.safe_load((tmp_path / "params" / "prepare.yaml").read_text())
    assert written["seed"] == 7 and written["image_size"] == 8
    bad = run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "prepare.fit=stretch"], tmp_path, check=False)
    assert bad.returncode == 2 and "key 'fit' = 'stretch'" in bad.stderr

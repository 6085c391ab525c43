"""The MLflow experiment as `mlflow ui` shows it: a model-training experiment whose runs view has
the headline metrics as columns."""

import json

import pytest

from runtime.tracking import EXPERIMENT_KIND, HEADLINE, client, experiment_id, ui_url


@pytest.fixture
def store(in_tmp, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{in_tmp / 'mlflow.db'}")
    return client()


def test_the_experiment_is_a_model_training_one_with_a_headline_runs_view(store):
    experiment = store.get_experiment(experiment_id(store))
    assert experiment.tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.headline"])
    assert [f"metrics.`{metric}`" for metric in HEADLINE] == view["selectedColumns"][: len(HEADLINE)]
    url = ui_url()
    assert url.endswith(f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=headline")


def test_an_experiment_from_before_gets_the_tags_and_a_kind_someone_chose_stays(store):
    old = store.create_experiment("latentlab")
    assert experiment_id(store) == old
    assert store.get_experiment(old).tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    store.set_experiment_tag(old, EXPERIMENT_KIND[0], "genai_development")
    experiment_id(store)
    assert store.get_experiment(old).tags[EXPERIMENT_KIND[0]] == "genai_development"

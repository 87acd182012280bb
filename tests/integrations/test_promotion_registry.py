"""The alias move against the session's real `mlflow server`: compare-and-set when another run promoted in
between (the later run is compared against the newly promoted version), idempotent retries, `previous`."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from adapterflow.flows.parameters import MlflowSettings
from adapterflow.integrations.mlflow_promotion import record_promotion
from adapterflow.runtime.gate import decide


@pytest.fixture
def registry(mlflow_server, request):
    """A registered model with three versions (runs of their own; no adapter files: the re-evaluation is the
    test's callback here, the flow test covers the real one)."""
    client = MlflowClient(mlflow_server, mlflow_server)
    name = f"race-{request.node.name[5:40]}".replace("_", "-")
    client.create_registered_model(name)
    experiment = client.create_experiment(name)
    runs = [client.create_run(experiment).info.run_id for _ in range(3)]
    versions = [client.create_model_version(name, f"runs:/{run}/model", run_id=run).version for run in runs]
    return client, name, dict(zip(map(str, versions), runs)), MlflowSettings(tracking_uri=mlflow_server)


def promote(registry, version, loss, evaluated_holder, holder_loss=None, flow_run_id=None, calls=None, **kw):
    client, name, runs, settings = registry

    def reevaluate(holder):
        calls.append(holder["version"]) if calls is not None else None
        return decide("eval_loss", loss, 9.0, losses[holder["version"]], champion_version=holder["version"]).to_dict()

    decision = decide("eval_loss", loss, 9.0, holder_loss, champion_version=evaluated_holder).to_dict()
    return record_promotion(settings, settings.tracking_uri, name=name, version=version, alias="champion",
                            run_id=runs[version], flow_run_id=flow_run_id or f"flow-{version}", decision=decision,
                            evaluated_holder=evaluated_holder, reevaluate=reevaluate, **kw)


losses = {"1": 2.0, "2": 1.0, "3": 1.5}


def holder(registry, alias="champion"):
    client, name = registry[0], registry[1]
    return client.get_model_version_by_alias(name, alias).version


def test_a_later_run_is_compared_against_the_newly_promoted_version(registry):
    # Runs 2 and 3 both evaluated while no version held the alias; 2 finishes first and is promoted.
    first = promote(registry, "2", losses["2"], None)
    assert first["promoted"] and holder(registry) == "2" and first["previous"] is None
    calls = []
    late = promote(registry, "3", losses["3"], None, calls=calls)  # its decision (vs nobody) said promote
    assert calls == ["2"] and late["reevaluated"] == ["2"]
    assert not late["promoted"] and holder(registry) == "2"
    assert "not better than version 2's 1" in late["reason"]
    client, name, runs = registry[0], registry[1], registry[2]
    tags = client.get_model_version(name, "3").tags
    assert tags["promotion"] == "rejected" and tags["promotion.champion_version"] == "2"
    assert client.get_run(runs["3"]).data.tags["promotion"] == "rejected"


def test_a_better_late_run_still_moves_the_alias_and_sets_previous(registry):
    promote(registry, "3", losses["3"], None)
    late = promote(registry, "2", losses["2"], None)  # evaluated before 3 was promoted; better than 3 too
    assert late["promoted"] and late["reevaluated"] == ["3"] and late["previous"] == "3"
    assert holder(registry) == "2" and holder(registry, "previous") == "3"
    assert not late["overtaken"]


def test_a_retry_moves_nothing_twice(registry):
    client, name = registry[0], registry[1]
    promote(registry, "1", losses["1"], None)
    first = promote(registry, "2", losses["2"], "1", holder_loss=losses["1"])
    assert first["promoted"] and holder(registry) == "2" and holder(registry, "previous") == "1"
    client.set_registered_model_alias(name, "previous", "3")  # a marker: a second move would overwrite it
    calls = []
    again = promote(registry, "2", losses["2"], "1", holder_loss=losses["1"], calls=calls)
    assert again["recorded_before"] and again["promoted"] and calls == []
    assert holder(registry) == "2" and holder(registry, "previous") == "3"


def test_a_retry_after_the_move_but_before_the_tags_records_the_promotion(registry):
    client, name = registry[0], registry[1]
    client.set_registered_model_alias(name, "champion", "2")  # the first attempt moved it, then failed
    result = promote(registry, "2", losses["2"], None)
    assert result["promoted"] and holder(registry) == "2"
    assert client.get_model_version(name, "2").tags["promotion.flow_run_id"] == "flow-2"


def test_a_rejected_approval_keeps_the_alias(registry):
    client, name = registry[0], registry[1]
    result = promote(registry, "1", losses["1"], None, approval={"decision": "rejected", "comment": "not today"})
    assert not result["promoted"] and "reviewer rejected it: not today" in result["reason"]
    assert client.get_registered_model(name).aliases == {}
    tags = client.get_model_version(name, "1").tags
    assert tags["promotion.approval"] == "rejected" and tags["promotion.approval_comment"] == "not today"

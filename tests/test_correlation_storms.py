"""Correlation scored on labelled storms (tests/storms.py): kube-prometheus
alerts, the loopback Kubernetes API as the cluster, real PostgreSQL."""

import pytest

from tests import storms


@pytest.fixture(scope="module")
def scored():
    return []


@pytest.mark.parametrize("scenario", storms.SCENARIOS, ids=[s.name for s in storms.SCENARIOS])
def test_storm_grouping(clean_db, kube, scenario, scored):
    steps = storms.prepare(scenario, kube)
    storms.feed(clean_db, storms.correlator_for(scenario, kube.kubeconfig_path), steps)
    got = storms.grouping(clean_db, steps)
    result = storms.score(steps, got)
    scored.append((scenario, result))
    print("\n".join(storms.table([(scenario, result)])))
    assert result.precision >= 0.95, (scenario.name, result)
    assert result.recall >= 0.90, (scenario.name, result)


def test_storms_overall_precision_and_recall(scored):
    assert len(scored) == len(storms.SCENARIOS) >= 10
    total = storms.overall(scored)
    print("\n".join(storms.table(scored)))
    assert total.precision >= 0.95 and total.recall >= 0.90, total

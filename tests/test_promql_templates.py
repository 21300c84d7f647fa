"""Label values filled into PromQL templates (diagnostics' probes, a
playbook's verify query) are literals: inside a regex matcher they match
themselves only, and no value can end the quoted string it sits in."""

import json
import re

import pytest

from functions.diagnostics.collector import load_probes
from shared.templating import TemplateError, render_promql

THROTTLING = 'sum(rate(x{namespace="{{ namespace }}",pod=~"{{ deployment }}-.*",container!=""}[5m]))'


def matcher_values(promql: str, label: str) -> list[str]:
    """The strings the matchers of ``label`` compare with, as Prometheus
    reads them (PromQL strings use Go's escapes, which JSON shares for these)."""
    return [json.loads(quoted) for quoted in re.findall(rf'{label}\s*[=!]~?\s*("(?:[^"\\]|\\.)*")', promql)]


def matcher_value(promql: str, label: str) -> str:
    (value,) = set(matcher_values(promql, label))
    return value


@pytest.mark.parametrize("name, own_pod, other_pod", [
    ("web.v2", "web.v2-7d9f-abcde", "webxv2-7d9f-abcde"),
    ("x|.*", "x|.*-1", "anything-at-all"),
    ("api(+)", "api(+)-1", "api-1"),
])
def test_a_deployment_in_a_regex_matcher_matches_its_own_pods_only(name, own_pod, other_pod):
    promql = render_promql(THROTTLING, {"namespace": "shop", "deployment": name})
    pods = re.compile(matcher_value(promql, "pod"))  # Prometheus anchors the regex: fullmatch
    assert pods.fullmatch(own_pod)
    assert not pods.fullmatch(other_pod)


def test_an_equality_matcher_keeps_the_value_as_it_is():
    promql = render_promql(THROTTLING, {"namespace": "a.b|c", "deployment": "d"})
    assert matcher_value(promql, "namespace") == "a.b|c"


@pytest.mark.parametrize("value", ['x"}) or vector(1) #', 'back\\slash', "new\nline"])
def test_no_value_ends_the_string_it_is_filled_into(value):
    promql = render_promql(THROTTLING, {"namespace": value, "deployment": value})
    assert matcher_value(promql, "namespace") == value
    assert re.compile(matcher_value(promql, "pod")).fullmatch(value + "-1")
    assert promql.endswith(',container!=""}[5m]))')


def _templates(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _templates(value)
    elif isinstance(node, str):
        yield node


def test_every_shipped_probe_renders_a_literal_deployment():
    """The probes diagnostics ships: a deployment's dots are never a wildcard."""
    templates = [t for t in _templates(load_probes()) if re.search(r'=~"[^"]*\{\{\s*deployment', t)]
    assert templates, "no shipped probe matches pods by their deployment"
    for template in templates:
        promql = render_promql(template, {"namespace": "shop", "deployment": "web.v2", "service": "web"})
        for pattern in matcher_values(promql, "pod"):
            pods = re.compile(pattern)
            assert pods.fullmatch("web.v2-7d9f-abcde") and not pods.fullmatch("webxv2-7d9f-abcde"), promql


@pytest.mark.parametrize("template, expected", [
    ('pod=~"{{ deployment }}-.*"', 'pod=~"web\\\\.v2-.*"'),
    ("pod=~'{{ deployment }}-.*'", "pod=~'web\\\\.v2-.*'"),
    ("pod!~ `{{ deployment }}-.*`", "pod!~ `web\\.v2-.*`"),  # a raw string keeps one backslash
    ('up{job="{{ deployment }}"}', 'up{job="web.v2"}'),
    ("up{job='{{ deployment }}'}", "up{job='web.v2'}"),
])
def test_every_kind_of_promql_string_gets_a_literal(template, expected):
    assert render_promql(template, {"deployment": "web.v2"}) == expected


def test_a_single_quoted_value_cannot_close_its_string():
    promql = render_promql("up{job='{{ j }}'}", {"j": "a'} or vector(1) or up{x='"})
    assert promql == "up{job='a\\'} or vector(1) or up{x=\\''}"


def test_a_backquote_cannot_go_into_a_raw_string():
    with pytest.raises(TemplateError, match="backquote"):
        render_promql("up{job=`{{ j }}`}", {"j": "a`b"})


def test_a_quote_in_a_comment_opens_no_string():
    template = '# the pod\'s restarts\nsum(x{pod=~"{{ deployment }}-.*"}) or y{pod="{{ pod }}"}'
    promql = render_promql(template, {"deployment": "web.v2", "pod": 'x"} or up{a="'})
    assert re.compile(matcher_values(promql, "pod")[0]).fullmatch("web.v2-1")
    assert matcher_values(promql, "pod")[1] == 'x"} or up{a="'

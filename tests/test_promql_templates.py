"""Label values filled into PromQL templates (diagnostics' probes, a
playbook's verify query) are literals: inside a regex matcher they match
themselves only, and no value can end the quoted string it sits in."""

import json
import re

import pytest
import yaml

from functions.diagnostics.collector import load_probes
from functions.diagnostics.probes import ProbeConfigError
from functions.remediation import playbooks
from functions.remediation.playbooks import PlaybookError
from loopback.processes import wait_until
from shared.templating import TemplateError, re2_literal, render_promql

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


# A label value is chosen by whoever sends the alert. These must stay the
# literal they are wherever a template puts them.
HOSTILE = [
    'x"}) or vector(1) #',
    "x'} or vector(1) or up{a='",
    ") or vector(1)",
    "back\\slash\\",
    '"}',
    "new\nline",
    "cr\rand\ttab",
    "a.b",
    "x|.*",
    ".*",
    "api(+)[0-9]{2}^$",
    "ünïcødé ✓ 日本\u2028",
]


@pytest.mark.parametrize("template", [
    "sum(rate(x[5m])) > {{ labels.threshold }}",
    "up{ {{ labels.name }}=\"x\"}",
    "rate(x[{{ labels.window }}])",
    'up{job="a"} # {{ labels.note }}',
    "{{ service }}",
])
def test_a_placeholder_outside_a_string_is_refused_whatever_the_value(template):
    context = {"service": "web", "labels": {"threshold": "1) or vector(1", "name": "job", "window": "5m", "note": "x\ny"}}
    with pytest.raises(TemplateError, match="outside a quoted string"):
        render_promql(template, context)


def test_an_unclosed_string_is_refused():
    with pytest.raises(TemplateError, match="not closed"):
        render_promql('up{job="{{ service }}}', {"service": "web"})


def test_a_probe_file_with_a_placeholder_outside_a_string_is_refused_at_load(tmp_path):
    path = tmp_path / "probes.yaml"
    path.write_text(
        "defaults:\n  metrics:\n    fine: 'up{job=\"{{ service }}\"}'\n"
        "services:\n  shop:\n    metrics:\n      errors: 'rate(errors_total[5m]) > {{ labels.threshold }}'\n"
    )
    with pytest.raises(ProbeConfigError, match=r"services\.shop\.metrics\.errors: \{\{ labels\.threshold \}\} is outside a quoted string"):
        load_probes(str(path))


def test_a_playbook_verify_query_with_a_placeholder_outside_a_string_is_refused_at_load():
    spec = {"playbooks": [{
        "name": "scale-web", "match": {"alertname": "HighLatency"},
        "actions": [{"action": "escalate"}],
        "verify": {"promql": "histogram_quantile(0.95, x) < {{ labels.slo }}"},
    }]}
    with pytest.raises(PlaybookError, match=r"playbook 'scale-web': field 'verify.promql': \{\{ labels\.slo \}\} is outside"):
        playbooks.parse(spec, "test")


def test_the_shipped_templates_pass_the_load_check():
    load_probes()
    playbooks.parse(yaml.safe_load(playbooks.DEFAULT_FILE.read_text()), "shipped")


@pytest.mark.parametrize("value", HOSTILE + ["nul\x00bell\x07del\x7f"])
@pytest.mark.parametrize("quote", ['"', "'"])
def test_a_rendered_string_holds_no_raw_control_character(value, quote):
    promql = render_promql(f"up{{a={quote}{{{{ v }}}}{quote}, b=~{quote}{{{{ v }}}}{quote}}}", {"v": value})
    assert not any(c < " " or c == "\x7f" for c in promql), repr(promql)
    assert "\u2028" not in value or "\u2028" in promql  # printable unicode is kept as it is


def test_a_lone_surrogate_is_refused_not_sent():
    with pytest.raises(TemplateError, match="surrogate"):
        render_promql('up{a="{{ v }}"}', {"v": "x\ud800"})


def test_a_carriage_return_cannot_go_into_a_raw_string():
    """Go drops carriage returns from raw strings, so the value would change."""
    with pytest.raises(TemplateError, match="carriage return"):
        render_promql("up{job=`{{ j }}`}", {"j": "a\rb"})


def test_regex_escaping_is_re2s_own():
    """Exactly Go's regexp.QuoteMeta: RE2's metacharacters, nothing else."""
    assert re2_literal("a.b-c d#e&f~g") == "a\\.b-c d#e&f~g"
    assert re2_literal("\\.+*?()|[]{}^$") == "\\\\\\.\\+\\*\\?\\(\\)\\|\\[\\]\\{\\}\\^\\$"


@pytest.fixture(scope="module")
def hostile_series(prometheus):
    """One series per hostile value and decoys an unescaped regex or an
    unclosed string would match, each case under its own ``case`` label."""
    lines = []
    for case, value in enumerate(HOSTILE):
        for pod in {value, value + "-1", "decoy", "decoy-1", value.replace(".", "x"), value.replace("|", "")}:
            lines.append(f'hostile_probe{{case="{case}",pod="{_exposition(pod)}"}} 1')
    prometheus.exporter.extra["hostile"] = lines
    wait_until(lambda: len(prometheus.query("hostile_probe")) == len(lines), 30, interval=0.2, message="hostile series scraped")
    yield prometheus
    prometheus.exporter.extra.pop("hostile", None)


def _exposition(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@pytest.mark.parametrize("case", range(len(HOSTILE)))
@pytest.mark.parametrize("template, wanted", [
    ('hostile_probe{case="{{ case }}",pod="{{ pod }}"}', lambda v: {v}),
    ("hostile_probe{case='{{ case }}',pod='{{ pod }}'}", lambda v: {v}),
    ('hostile_probe{case="{{ case }}",pod=~"{{ pod }}"}', lambda v: {v}),
    ("hostile_probe{case='{{ case }}',pod=~'{{ pod }}-.*'}", lambda v: {v + "-1"}),
    ('hostile_probe{case="{{ case }}",pod!~"{{ pod }}|decoy.*"}', lambda v: {v + "-1", v.replace(".", "x"), v.replace("|", "")} - {v, "decoy", "decoy-1"}),
    ('hostile_probe{case="{{ case }}",pod=~`{{ pod }}`}', lambda v: {v}),
])
def test_prometheus_reads_a_hostile_value_as_the_literal_it_is(hostile_series, case, template, wanted):
    """The real Prometheus: the rendered query parses, selects exactly the
    series whose label is the value (an injected ``or vector(1)`` would add a
    series without ``pod``), and a regex matcher treats the value literally."""
    value = HOSTILE[case]
    context = {"case": str(case), "pod": value}
    if "`" in template and "\r" in value:
        # A raw string cannot hold a carriage return: refused, never sent.
        with pytest.raises(TemplateError, match="carriage return"):
            render_promql(template, context)
        return
    found = hostile_series.query(render_promql(template, context))
    assert all(r["metric"].get("__name__") == "hostile_probe" and r["metric"].get("case") == str(case) for r in found), found
    assert {r["metric"]["pod"] for r in found} == wanted(value)

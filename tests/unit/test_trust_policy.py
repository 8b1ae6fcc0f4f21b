"""Trust policies: parse errors name file, line, field and reason; effective policies merge
process over tenant over defaults; the store keeps every version across a restart."""

from __future__ import annotations

import json
import os
import stat

import pytest

from services.trust.policy import DEFAULTS, effective, merge, parse_document
from services.trust.policy_store import PolicyStore
from vfmos_runtime.errors import InvalidArgument


def error_of(document: str, filename: str = "policy.yaml") -> str:
    with pytest.raises(InvalidArgument) as caught:
        parse_document(document, filename)
    return caught.value.message


def test_the_issue_example_names_file_line_field_and_reason():
    doc = "level: fast\n" + "\n" * 9 + "thresholds:\n  moderation: 1.4\n"
    assert error_of(doc) == "policy.yaml:12: thresholds.moderation must be 0..1, got 1.4"


@pytest.mark.parametrize("document, expected", [
    ("level: loud\n", "policy.yaml:1: level must be one of off, fast, standard, strict, got 'loud'"),
    ("on_unavailable: maybe\n", "policy.yaml:1: on_unavailable must be one of refuse, allow"),
    ("thresholds:\n  pii: yes\n", "policy.yaml:2: thresholds.pii must be a number, got str 'yes'"),
    ("thresholds:\n  pii: .nan\n", "policy.yaml:2: thresholds.pii must be 0..1, got nan"),
    ("uncertain_band: [0.6, 0.2]\n", "policy.yaml:1: uncertain_band must have low < high"),
    ("uncertain_band: {moderation: [0.1]}\n",
     "policy.yaml:1: uncertain_band.moderation must be [low, high], got [0.1]"),
    ("pii:\n  action: hide\n", "policy.yaml:2: pii.action must be one of redact, refuse, allow"),
    ("pii:\n  entities:\n    - EMAIL_ADDRESS\n    - EMAIL\n",
     "policy.yaml:4: pii.entities[1] is not a known entity (did you mean 'EMAIL_ADDRESS'?)"),
    ("regexes:\n  - name: ids\n    pattern: 'INT-('\n",
     "policy.yaml:3: regexes[0].pattern is not a valid regular expression"),
    ("regexes:\n  - name: ids\n", "policy.yaml:2: regexes[0] needs 'pattern'"),
    ("regexes:\n  - name: a\n    pattern: x\n  - name: a\n    pattern: y\n",
     "policy.yaml:4: regexes[1].name repeats the name 'a'"),
    ("denied_topics:\n  - name: crypto\n    description: ''\n",
     "policy.yaml:3: denied_topics[0].description must be a non-empty string"),
    ("escalation_rules:\n  - name: r\n    when: {amount_above: 500}\n",
     "policy.yaml:3: escalation_rules[0].when needs a 'topic' or a 'pattern'"),
    ("escalation_rules:\n  - name: r\n    when: {topic: refund, amount_above: -1}\n",
     "policy.yaml:3: escalation_rules[0].when.amount_above must be 0..1e+15, got -1"),
    ("revision:\n  max_revisions: 1.5\n",
     "policy.yaml:2: revision.max_revisions must be a whole number"),
    ("audit:\n  store_text: 1\n", "policy.yaml:2: audit.store_text must be true or false"),
    ("domain_rules: [3]\n", "policy.yaml:1: domain_rules[0] must be a mapping"),
    ("level: fast\nlevel: off\n", "policy.yaml:2: level is set twice"),
    ("- level\n", "policy.yaml:1: the policy must be a mapping of settings, got a list"),
    ("level: [\n", "policy.yaml:2: not valid YAML or JSON"),
])
def test_each_kind_of_bad_value_is_refused_with_its_line(document, expected):
    assert error_of(document).startswith(expected)


def test_unknown_keys_suggest_the_closest_known_name():
    message = error_of("levl: fast\nthresholds:\n  injecton: 0.3\npii:\n  acton: redact\n")
    assert message.splitlines() == [
        "policy.yaml:1: levl is not a known setting (did you mean 'level'?)",
        "policy.yaml:3: thresholds.injecton is not a known setting (did you mean 'injection'?)",
        "policy.yaml:5: pii.acton is not a known setting (did you mean 'action'?)"]


def test_json_is_a_policy_too_and_its_errors_have_lines():
    assert parse_document('{"level": "fast"}', "p.json") == {"level": "fast"}
    assert error_of('{\n  "level": "fast",\n  "thresholds": {"leak": 2}\n}', "p.json") \
        .startswith("p.json:3: thresholds.leak must be 0..1, got 2")


def test_yaml_1_1_booleans_do_not_turn_words_into_true_or_false():
    # in YAML 1.1 `off` is false and the key `on` is true
    parsed = parse_document("level: off\nregexes:\n  - name: x\n    pattern: y\n    on: output\n")
    assert parsed["level"] == "off" and parsed["regexes"][0]["on"] == "output"


def test_an_empty_document_is_the_defaults_and_defaults_are_complete():
    assert parse_document("") == {}
    policy = effective()
    assert policy.level == "standard" and policy.on_unavailable == "refuse"
    assert policy.pii_action == "redact" and policy.pii_external == "pseudonymize"
    assert policy.store_text is False and policy.judge_model == "gemma3-270m"
    assert json.loads(policy.to_json()) == DEFAULTS


def test_effective_policy_is_process_over_tenant_over_defaults():
    tenant = parse_document("level: strict\nthresholds:\n  moderation: 0.8\n  leak: 0.7\n"
                            "denied_topics:\n  - {name: crypto, description: crypto advice}\n")
    process = parse_document("thresholds:\n  moderation: 0.3\nuncertain_band: [0.1, 0.2]\n"
                             "denied_topics: []\n")
    policy = effective(tenant, process)
    assert policy.level == "strict"                      # from the tenant
    assert policy.threshold("moderation") == 0.3         # the process wins
    assert policy.threshold("leak") == 0.7               # the tenant's, merged key by key
    assert policy.threshold("pii") == 0.5                # the default
    assert policy.band("injection") == (0.1, 0.2)
    assert policy.denied_topics == ()                    # lists are replaced, not joined
    assert effective(tenant).denied_topics[0].name == "crypto"
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_domain_rules_go_through_the_injected_validator_with_their_place():
    seen = []

    def parse_rules(obj, where):
        seen.append(where)
        if "max" not in obj[0]:
            raise ValueError("needs max")

    doc = "domain_rules:\n  - {quantity: band_gap, max: 10}\n  - {quantity: density}\n"
    with pytest.raises(InvalidArgument) as caught:
        parse_document(doc, "m.yaml", parse_rules)
    assert caught.value.message == "m.yaml:3: domain_rules[1] needs max"
    assert seen == ["m.yaml:2: domain_rules[0]", "m.yaml:3: domain_rules[1]"]


def test_store_appends_versions_and_keeps_them_across_a_restart(tmp_path):
    store = PolicyStore(tmp_path)
    first = store.put("unix:bob", 0, "level: fast\n", {"level": "fast"}, author="unix:bob")
    second = store.put("unix:bob", 0, "level: strict\n", {"level": "strict"}, author="root")
    own = store.put("unix:bob", 7, "level: off\n", {"level": "off"})
    store.put("unix:bo", 0, "level: off\n", {"level": "off"})   # a prefix of another tenant
    assert (first.version, second.version, own.version) == (1, 2, 1)
    store.close()

    reopened = PolicyStore(tmp_path)
    latest = reopened.latest("unix:bob", 0)
    assert latest.version == 2 and latest.document == "level: strict\n"
    assert latest.author == "root" and latest.parsed == {"level": "strict"}
    assert len(latest.sha256) == 64 and latest.sha256 != first.sha256
    assert [v.version for v in reopened.history("unix:bob", 0)] == [1, 2]
    assert [v.document for v in reopened.history("unix:bob", 7)] == ["level: off\n"]
    assert reopened.latest("unix:alice", 0) is None
    assert reopened.put("unix:bob", 0, "level: fast\n", {"level": "fast"}).version == 3
    reopened.close()
    # tenants' policies are private to the daemon's user
    assert stat.S_IMODE(os.stat(tmp_path / "policies.lmdb").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "policies.lmdb" / "data.mdb").st_mode) == 0o600

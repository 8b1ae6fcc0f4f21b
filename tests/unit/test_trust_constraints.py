"""Constraint verification (system 2): statements with units against a tenant's domain rules,
proven with z3; rule validation names the bad field's path."""

from __future__ import annotations

import pytest

from services.trust.claims import Relation, extract
from services.trust.constraints import ConstraintChecker, parse_rules

RULES = [
    {"name": "band_gap_nonnegative", "quantity": "band_gap", "unit": "eV", "min": 0},
    {"name": "density_range", "quantity": "density", "unit": "g/cm3", "min": 0.01, "max": 25},
    {"name": "metal_zero_gap", "when": "is_metal", "require": "band_gap == 0"},
    {"name": "small_gap_semiconductor", "when": "is_semiconductor", "require": "band_gap <= 1.5"},
    {"name": "static_above_electronic",
     "require": "dielectric_total >= dielectric_electronic"},
    {"name": "above_absolute_zero", "quantity": "melting_point", "unit": "K", "min": 0},
]


@pytest.fixture(scope="module")
def checker() -> ConstraintChecker:
    return ConstraintChecker(parse_rules(RULES))


def test_a_negative_band_gap_is_a_violation_named_with_its_span(checker):
    answer = "WS2 is a layered compound with a band gap of -0.3 eV."
    finding = checker.check(answer)
    assert finding.score == 1.0 and finding.system == 2
    assert [(s.label, answer[s.start:s.end]) for s in finding.spans] == \
        [("band_gap_nonnegative", "band gap of -0.3 eV")]
    assert "band_gap_nonnegative" in finding.reason and "WS2" in finding.reason


def test_a_metal_with_a_2_ev_gap_is_a_violation(checker):
    answer = "Cu is a metal with a band gap of 2 eV."
    finding = checker.check(answer)
    assert finding.score == 1.0
    assert finding.details["violated"] == ["metal_zero_gap"]
    assert {answer[s.start:s.end] for s in finding.spans} == {"is a metal", "band gap of 2 eV"}


def test_true_statements_are_consistent(checker):
    finding = checker.check("GaAs has a band gap of 1.42 eV and a density of 5.32 g/cm3. "
                            "Cu is a metal with no band gap: a gap of 0 eV.")
    assert finding.score == 0.0, finding.reason
    assert finding.spans == ()
    assert finding.details["claims"] == 4


def test_statements_about_two_compounds_are_not_mixed(checker):
    # Cu's "metal" must not meet GaAs's 1.4 eV.
    finding = checker.check("Cu is a metal. GaAs has a band gap of 1.4 eV.")
    assert finding.score == 0.0, finding.reason


def test_units_are_converted_before_the_rules_apply(checker):
    claim, = extract("The band gap of Si is 1500 meV.")
    assert claim.quantity == "band_gap" and claim.relation is Relation.EQ
    assert claim.canonical()[0] == 1.5  # exactly, as a fraction
    semiconductor = "Si is a semiconductor with a band gap of {}."
    assert checker.check(semiconductor.format("1500 meV")).score == 0.0
    assert checker.check(semiconductor.format("1600 meV")).score == 1.0
    assert checker.check("NaCl has a density of 2160 kg/m3.").score == 0.0
    assert checker.check("NaCl has a density of 2.16 kg/m3.").score == 1.0  # 0.00216 g/cm3
    assert checker.check("ZnO has a melting point of 1975 °C.").score == 0.0
    assert checker.check("ZnO has a melting point of -300 °C.").score == 1.0  # below 0 K


def test_ranges_and_inequalities_are_checked(checker):
    assert checker.check("Its band gap lies between 2 and 4 eV.").score == 0.0
    assert checker.check("Its band gap is below -0.5 eV.").score == 1.0
    assert checker.check("A density of 30-40 g/cm3 is typical.").score == 1.0


def test_a_relation_between_two_quantities(checker):
    ok = checker.check("GaN has an electronic dielectric constant of 5.3 and a static "
                       "dielectric constant of 9.5.")
    bad = checker.check("GaN has an electronic dielectric constant of 5.3 and a static "
                        "dielectric constant of 4.1.")
    assert ok.score == 0.0 and bad.score == 1.0
    assert bad.details["violated"] == ["static_above_electronic"]


def test_a_wrong_unit_is_a_violation_and_an_unknown_one_is_uncertain(checker):
    wrong = checker.check("WS2 has a band gap of 1.5 g/cm3.")
    assert wrong.score == 1.0 and "density unit" in wrong.reason
    unknown = checker.check("WS2 has a band gap of 1.5 eVs.")
    assert 0.0 < unknown.score < 1.0
    assert "unknown unit 'eVs'" in unknown.reason


def test_metal_in_a_compound_name_is_no_classification(checker):
    finding = checker.check("MoS2 is a transition metal dichalcogenide with a band gap of 1.8 eV.")
    assert finding.score == 0.0, finding.reason


def test_an_answer_without_checkable_statements_is_consistent(checker):
    finding = checker.check("Perovskites are promising for solar cells.")
    assert finding.score == 0.0 and finding.reason == "no checkable statements"


@pytest.mark.parametrize("rules, message", [
    ([{"name": "gap", "quantity": "band_gap", "unit": "eV", "min": 0},
      {"name": "d", "quantity": "density", "unit": "g/cm3", "max": 25},
      {"name": "x", "quantity": "band_gap", "unit": "eVs", "min": 0}],
     "domain_rules[2].unit: unknown unit 'eVs'"),
    ({"name": "a"}, "domain_rules: must be a list of rules, got dict"),
    ([{"quantity": "band_gap", "min": 0}], "domain_rules[0].name: required"),
    ([{"name": "a", "quantity": "bandgap", "min": 0}],
     "domain_rules[0].quantity: unknown quantity 'bandgap'"),
    ([{"name": "a", "quantity": "density", "unit": "K", "min": 0}],
     "domain_rules[0].unit: 'K' is a temperature unit, density is a density"),
    ([{"name": "a", "quantity": "density", "min": "low"}],
     "domain_rules[0].min: must be a number, got 'low'"),
    ([{"name": "a", "quantity": "density", "min": 3, "max": 1}],
     "domain_rules[0].min: must be <= max"),
    ([{"name": "a", "quantity": "density"}], "domain_rules[0]: a quantity rule needs min or max"),
    ([{"name": "a", "require": "band_gap =="}], "domain_rules[0].require: cannot parse"),
    ([{"name": "a", "require": "gap > 0"}], "domain_rules[0].require: unknown name 'gap'"),
    ([{"name": "a", "when": "band_gap", "require": "is_metal"}],
     "domain_rules[0].when: must be a condition"),
    ([{"name": "a", "require": "band_gap > 0"}, {"name": "a", "require": "density > 0"}],
     "domain_rules[1].name: duplicate rule name 'a'"),
    ([{"name": "a", "maximum": 3}], "domain_rules[0]: unknown field 'maximum'"),
])
def test_bad_rules_name_the_path(rules, message):
    with pytest.raises(ValueError) as error:
        parse_rules(rules)
    assert str(error.value).startswith(message)


def test_the_path_prefix_is_the_callers():
    with pytest.raises(ValueError, match=r"^policy\.domain_rules\[0\]\.unit: "):
        parse_rules([{"name": "a", "quantity": "band_gap", "unit": "volts", "min": 0}],
                    where="policy.domain_rules")


@pytest.mark.parametrize("answer", [
    "Cu is metallic; its band gap is 1.6 eV.",          # "metallic" was read as "metal"+"lic"
    "With a band gap of 2 eV, Cu is metallic.",          # the compound is named after the gap
    "Cu, a metal, has a band gap of 2 eV.",              # an appositive classification
])
def test_a_gapped_metal_is_caught_in_other_phrasings(checker, answer):
    finding = checker.check(answer)
    assert finding.details["violated"] == ["metal_zero_gap"], finding.reason


def test_a_value_in_parentheses_after_its_phrase_is_read(checker):
    finding = checker.check("Although it has no band gap (0 eV), AlN is a semiconductor "
                            "and its gap exceeds 2 eV.")
    assert finding.details["claims"] == 3 and finding.score == 1.0, finding.reason

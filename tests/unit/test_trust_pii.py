"""The PII check on the real presidio, the real pinned spaCy pipeline and the shipped learned
NER: what it finds, that redaction and placeholders leave no original behind, and that it never
touches the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.trust.checks import Text
from services.trust.pii import (ENTITIES, PiiCheck, PiiDetector, pseudonymize, redact,
                                restore)

REPO = Path(__file__).resolve().parents[2]

# One text per entity, each value made up; (text, the value, its label).
SAMPLES = [
    ("Please send the invoice to dana.kowalski@example.org today.",
     "dana.kowalski@example.org", "EMAIL_ADDRESS"),
    ("You can reach me on my phone at 212-555-0143 after six.", "212-555-0143", "PHONE_NUMBER"),
    ("My credit card 4111 1111 1111 1111 was declined.", "4111 1111 1111 1111", "CREDIT_CARD"),
    ("Transfer it to IBAN GB82WEST12345698765432 please.", "GB82WEST12345698765432",
     "IBAN_CODE"),
    ("My social security number is 536-22-8471.", "536-22-8471", "US_SSN"),
    ("The login came from 203.0.113.77 last night.", "203.0.113.77", "IP_ADDRESS"),
    ("Yesterday I spoke with Margaret Thompson about the refund.", "Margaret Thompson", "PERSON"),
]


@pytest.fixture(scope="module")
def detector() -> PiiDetector:
    return PiiDetector()


@pytest.fixture(scope="module")
def check(detector) -> PiiCheck:
    return PiiCheck(detector=detector)


@pytest.mark.parametrize("text,value,label", SAMPLES, ids=[s[2] for s in SAMPLES])
def test_each_entity_is_found(check, text, value, label):
    finding = check.check(Text(text))
    found = {(text[s.start:s.end], s.label) for s in finding.spans}
    assert (value, label) in found
    assert 0.0 < finding.score <= 1.0
    assert label.lower() in finding.reason


def test_a_text_without_pii_scores_zero(check):
    finding = check.check(Text("How do I change the payment due date of my credit card?"))
    assert finding.spans == ()
    assert finding.score == 0.0


def test_redaction_leaves_no_original(check):
    text = " ".join(s[0] for s in SAMPLES)
    redacted = redact(text, check.check(Text(text)))
    for _, value, label in SAMPLES:
        assert value not in redacted
        assert f"<{label}>" in redacted


def test_a_street_address_is_covered_by_locations_and_nothing_else(check):
    """Street, town, region and postcode may come out as one LOCATION or as its parts (the
    set's forms mark them apart); together they cover the address and only the address."""
    text = "Please ship it to 742 Evergreen Terrace, Springfield, Oregon 97403. Thanks!"
    finding = check.check(Text(text))
    start, end = text.index("742"), text.index("97403") + 5
    assert {s.label for s in finding.spans} == {"LOCATION"}
    covered = {i for s in finding.spans for i in range(s.start, s.end)}
    assert {i for i in range(start, end) if text[i].isalnum()} <= covered
    assert min(covered) == start and max(covered) == end - 1
    assert "742" not in redact(text, finding) and "Springfield" not in redact(text, finding)


def test_entities_restrict_what_is_reported(detector):
    only_email = PiiCheck(entities=["EMAIL_ADDRESS"], detector=detector)
    text = SAMPLES[0][0] + " " + SAMPLES[6][0] + " Ship it to 742 Evergreen Terrace."
    finding = only_email.check(Text(text))
    assert {s.label for s in finding.spans} == {"EMAIL_ADDRESS"}


def test_a_batch_finds_what_one_by_one_finds(check):
    texts = [Text(s[0]) for s in SAMPLES] + [Text(""), Text("   ")]
    assert [f.spans for f in check.check_many(texts)] == [check.check(t).spans for t in texts]


def test_bad_configuration_is_refused_naming_the_field(detector):
    with pytest.raises(ValueError, match="entities: unknown PII entity PASSPORT"):
        PiiCheck(entities=["PASSPORT"], detector=detector)
    with pytest.raises(ValueError, match="threshold must be 0..1, got 1.5"):
        PiiCheck(threshold=1.5, detector=detector)


def test_pseudonymize_then_restore_round_trips(detector):
    texts = ["Write to dana.kowalski@example.org and copy Margaret Thompson.",
             "Did dana.kowalski@example.org answer? Ask lee.park@example.net too."]
    masked, placeholders = pseudonymize(texts, detector=detector)
    for original in ("dana.kowalski@example.org", "lee.park@example.net", "Margaret Thompson"):
        assert not any(original in m for m in masked)
    # one original, one placeholder, in every text
    assert masked[0].count("<EMAIL_ADDRESS_1>") == 1 and masked[1].count("<EMAIL_ADDRESS_1>") == 1
    assert "<EMAIL_ADDRESS_2>" in masked[1]
    assert [restore(m, placeholders) for m in masked] == texts


def test_an_original_found_once_is_masked_everywhere(detector):
    # The grouped digits are a phone number only next to a phone word; the second text has none,
    # yet the same value must not leave the host there either.
    texts = ["Please call me at 471 07 95 12 tomorrow.", "The code 471 07 95 12 did not work."]
    assert detector.find(texts[1]) == []
    masked, placeholders = pseudonymize(texts, detector=detector)
    assert masked == ["Please call me at <PHONE_NUMBER_1> tomorrow.",
                      "The code <PHONE_NUMBER_1> did not work."]
    assert [restore(m, placeholders) for m in masked] == texts


def test_restore_tolerates_what_a_model_does_to_placeholders(detector):
    _, placeholders = pseudonymize(["Mail dana.kowalski@example.org or lee.park@example.net "
                                    "about Margaret Thompson."], detector=detector)
    answer = ("I wrote to EMAIL_ADDRESS_1, to [email_address_2] and to <PERSON>; "
              "EMAIL_ADDRESS_12 is not ours.")
    assert restore(answer, placeholders) == (
        "I wrote to dana.kowalski@example.org, to lee.park@example.net and to Margaret Thompson;"
        " EMAIL_ADDRESS_12 is not ours.")
    # a bare label is ambiguous with two emails: left alone
    assert restore("see <EMAIL_ADDRESS>", placeholders) == "see <EMAIL_ADDRESS>"


def test_a_text_without_pii_is_unchanged(check):
    texts = ["What is the boiling point of water at sea level?"]
    masked, placeholders = check.pseudonymize(texts)
    assert masked == texts and placeholders == []
    assert restore(texts[0], placeholders) == texts[0]


# Runs in a fresh interpreter: sockets refuse and record every attempt, and tldextract's cache is
# an empty folder, so anything that fetched the public suffix list (tldextract's default when
# its cache is cold) would show up here.
_OFFLINE_PROBE = textwrap.dedent("""
    import json, socket
    attempts = []
    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network is off in this test")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    from services.trust.checks import Text
    from services.trust.pii import PiiCheck
    finding = PiiCheck().check(Text("Write to dana.kowalski@example.org or see www.example.com"))
    print(json.dumps({"attempts": attempts, "labels": [s.label for s in finding.spans]}))
""")


def test_the_check_never_touches_the_network(tmp_path):
    env = dict(os.environ, TLDEXTRACT_CACHE=str(tmp_path / "tld"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "proto")]))
    done = subprocess.run([sys.executable, "-c", _OFFLINE_PROBE], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["attempts"] == []
    assert "EMAIL_ADDRESS" in result["labels"]


def test_every_default_entity_is_supported(detector):
    supported = set(detector.supported_entities())
    assert set(ENTITIES) <= supported


def test_the_fast_path_still_finds_what_patterns_find(detector):
    fast = PiiCheck(detector=detector, fast=True)
    text = "how do i update the card 4111 1111 1111 1111 and mail dana.kowalski@example.org?"
    labels = {s.label for s in fast.check(Text(text)).spans}
    assert labels == {"CREDIT_CARD", "EMAIL_ADDRESS"}
    assert {s.label for s in fast.check(Text(SAMPLES[6][0])).spans} == {"PERSON"}


def test_an_iban_typed_in_lower_case_is_found(check):
    text = "my iban is gb82west12345698765432, thanks"
    spans = check.check(Text(text)).spans
    assert [(text[s.start:s.end], s.label) for s in spans] == [
        ("gb82west12345698765432", "IBAN_CODE")]


def test_a_text_longer_than_spacy_takes_is_read_in_pieces(detector):
    filler = "nothing to see here " * 60_000  # 1.2 million characters
    text = filler + "write to dana.kowalski@example.org " + filler
    hits = detector.find(text, entities=["EMAIL_ADDRESS"])
    assert [text[h.start:h.end] for h in hits] == ["dana.kowalski@example.org"]


def test_the_taggers_sentence_full_stop_is_trimmed_but_not_an_address_one():
    from services.trust.pii import Hit, _trim
    text = "Ship it to Kálmán Imre u. 12.\n Apt. 762, and to Main 5. Then Apt. 3. Later"
    end_of = lambda s: text.index(s) + len(s)  # noqa: E731
    cases = [("Kálmán Imre u. 12.", "Kálmán Imre u. 12."), ("Main 5.", "Main 5"),
             ("Apt. 3.", "Apt. 3")]
    for span, kept in cases:
        hit = _trim(text, Hit(text.index(span), end_of(span), "LOCATION", 0.9, True), True)
        assert text[hit.start:hit.end] == kept
    # a pattern's hit, and spaCy's, keep what they had
    phone = "call (08) 8747 6301"
    hit = _trim(phone, Hit(5, len(phone), "PHONE_NUMBER", 0.9, False), True)
    assert phone[hit.start:hit.end] == "(08) 8747 6301"
    year = "published (2020) in"
    hit = _trim(year, Hit(10, 15, "DATE_TIME", 0.8, True), True)
    assert year[hit.start:hit.end] == "2020"


def test_round_the_clock_is_not_a_date():
    from services.trust.pii import _specific_date
    assert [_specific_date(t) for t in ("24/7", "24x7", "7/30/1964", "1977", "May 5")] == [
        False, False, True, True, True]

"""Caption metrics through pycocoevalcap (real Java PTB tokenizer and METEOR).

Java start-up dominates (METEOR loads a 60 MB paraphrase table, ~7-9 s here), so the module runs
caption_metrics exactly twice, in module-scoped fixtures, and shares the results across asserts.
"""

import os
from pathlib import Path

import pytest

from safe.core.errors import SafeError
from safe.eval import captions
from safe.eval.captions import caption_metrics, ptb_tokenize

pytestmark = pytest.mark.skipif(captions.shutil.which("java") is None, reason="needs a Java runtime")

METRIC_KEYS = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"]

REFERENCES = {
    "clip_a": ["A dog barks loudly while cars pass by.", "A dog is barking near a busy road.",
               "Traffic noise and a barking dog."],
    "clip_b": ["Rain falls steadily on a metal roof.", "Heavy rain is hitting a roof.",
               "Raindrops patter on a tin roof."],
    "clip_c": ["A man speaks and a crowd applauds.", "People clap after a man gives a speech.",
               "Applause follows a short speech."],
    "clip_d": ["Birds chirp in the morning.", "Several birds sing outside.",
               "Birds are chirping and tweeting."],
}


def _meteor_children() -> list[int]:
    """PIDs of METEOR java processes whose parent is this test process."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"meteor" in cmdline.lower():
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def cider_calls():
    """Counts Cider.compute_score calls (and their set sizes) during the module's computations."""
    from pycocoevalcap.cider.cider import Cider

    calls = []
    original = Cider.compute_score

    def counting(self, gts, res):
        calls.append(len(gts))
        return original(self, gts, res)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Cider, "compute_score", counting)
        yield calls


@pytest.fixture(scope="module")
def perfect(cider_calls):
    """Every prediction equals its first reference."""
    before = len(cider_calls)
    result = caption_metrics({k: v[0] for k, v in REFERENCES.items()}, REFERENCES)
    return result, cider_calls[before:]


@pytest.fixture(scope="module")
def poor():
    """Wrong captions plus the degenerate ones: empty, punctuation only, embedded line breaks."""
    predictions = [
        "a woman plays the piano",
        "",
        "...",
        "rain\nfalls on a\rroof\u2028outside |||",
    ]
    return caption_metrics(predictions, list(REFERENCES.values()))


def test_perfect_predictions_score_the_maximum(perfect):
    result, _ = perfect
    # BLEU-n of predictions that equal a reference is 100 (pycocoevalcap adds a 1e-9 smoothing).
    for n in range(1, 5):
        assert result[f"bleu_{n}"] == pytest.approx(100.0, abs=1e-4)
    assert result["meteor"] == pytest.approx(100.0, abs=1e-6)
    assert result["rouge_l"] == pytest.approx(100.0, abs=1e-6)
    assert result["cider"] > 100.0  # CIDEr-D is x10, so a perfect match lands well above 100
    assert result["n"] == 4


def test_result_keys_and_scale(perfect, poor):
    for result in (perfect[0], poor):
        assert set(result) == set(METRIC_KEYS) | {"spice", "spider", "n", "note"}
        for key in METRIC_KEYS:
            assert isinstance(result[key], float) and result[key] >= 0.0


def test_wrong_and_degenerate_captions_score_lower(perfect, poor):
    assert poor["n"] == 4
    for key in METRIC_KEYS:
        assert poor[key] < perfect[0][key], key
    assert poor["cider"] < 50.0


def test_cider_is_one_call_over_the_whole_set(perfect):
    _, calls = perfect
    assert calls == [4]


def test_spice_missing_jars_reports_null_with_note(perfect):
    result, _ = perfect
    if captions.spice_jars_present():
        pytest.skip("SPICE jars are installed here")
    assert result["spice"] is None and result["spider"] is None
    assert "stanford-corenlp-3.6.0" in result["note"]


def test_no_meteor_process_is_left_running(perfect, poor):
    assert _meteor_children() == []


def test_ptb_tokenize_keeps_one_line_per_caption():
    # U+2028 and \r are line breaks for Java; they must not shift later captions.
    out = ptb_tokenize(["A Dog barks, loudly!", "line\u2028two\rthree\nfour", "...", "Café noise."])
    assert out == ["a dog barks loudly", "line two three four", "", "café noise"]


def test_input_mistakes_are_clear_errors():
    with pytest.raises(SafeError, match="no predictions"):
        caption_metrics({}, {})
    with pytest.raises(SafeError, match="aligned"):
        caption_metrics(["a dog"], [["a dog"], ["a cat"]])
    with pytest.raises(SafeError, match="no references"):
        caption_metrics({"x": "a dog"}, {"y": ["a dog"]})
    with pytest.raises(SafeError, match="must be a string"):
        caption_metrics({"x": None}, {"x": ["a dog"]})
    with pytest.raises(SafeError, match="reference caption for 'x' is empty"):
        caption_metrics({"x": "a dog"}, {"x": ["", "  "]})


def test_missing_java_is_a_safe_error(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    with pytest.raises(SafeError, match="Java is needed for METEOR"):
        caption_metrics({"x": "a dog"}, {"x": ["a dog"]})


def test_meteor_watchdog_turns_a_stuck_process_into_an_error(monkeypatch):
    # A watchdog far shorter than METEOR's start-up stands in for a hung Java process.
    monkeypatch.setattr(captions, "_METEOR_TIMEOUT_BASE_S", 0.5)
    monkeypatch.setattr(captions, "_METEOR_TIMEOUT_PER_ITEM_S", 0.0)
    java = captions.shutil.which("java")
    with pytest.raises(RuntimeError, match="METEOR failed or timed out"):
        captions._meteor_score(java, {0: ["a dog barks"]}, {0: ["a dog"]})
    assert _meteor_children() == []

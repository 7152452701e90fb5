"""Captioning metrics through the standard COCO caption tooling (pycocoevalcap).

`caption_metrics(predictions, references)` returns BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE and
SPIDEr on the 0-100 scale (raw x 100, as in the AudioCaps tables), plus `n` and `note`.

How the numbers are made, so they compare with papers:
- Every caption goes through the Stanford PTB tokenizer jar shipped with pycocoevalcap (lowercased,
  same punctuation tokens dropped as pycocoevalcap's PTBTokenizer). We run that jar ourselves
  instead of calling `PTBTokenizer.tokenize` because the wrapper writes its temp file into the
  installed package folder (fails on a read-only install) and splits lines the way Java does, so a
  caption containing U+2028 or "\\r" would shift every later caption onto the wrong id. Whitespace
  inside a caption (newlines included) is collapsed to single spaces first; nothing else changes.
- The scorers are pycocoevalcap's Bleu(4), Meteor (Java METEOR 1.5), Rouge (ROUGE-L) and Cider,
  which is CIDEr-D (clipped counts, length penalty, x10). CIDEr's IDF weights come from the
  references of the set being scored, so the whole set is scored in ONE Cider call; CIDEr of a
  tiny set is not comparable with a full-set figure (a single clip scores 0 because every n-gram
  then has IDF 0).
- SPICE needs the Stanford CoreNLP 3.6.0 jars: `safe metrics fetch-spice` puts them in the user cache
  (pycocoevalcap's own spice/lib is used too). Nothing is downloaded here; when they are missing (or
  SPICE fails) `spice` and `spider` are None and `note` says why (safe.eval.spice).
  SPIDEr = (CIDEr-D + SPICE) / 2.

Degenerate inputs, handled only inside the scorers (the caller's predictions are untouched):
- A prediction that is empty, or becomes empty after tokenization (e.g. "..."), is scored as the
  single token `EMPTY_PLACEHOLDER`, a word no reference contains, so it earns ~0 everywhere instead
  of tripping a scorer.
- Empty references are dropped; an item whose references are all empty is an error.
- METEOR's Java process only ever sees single-line tokenized text (a newline would desynchronise
  its line protocol and hang the reader), runs under a watchdog, and is always closed after use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from safe.core.errors import SafeError

JAVA_MISSING = ("Java is needed for METEOR and the PTB tokenizer: install a JRE "
                "(e.g. apt-get install openjdk-17-jre-headless).")
EMPTY_PLACEHOLDER = "emptyprediction"
# METEOR answers in milliseconds per caption once loaded; start-up reads a 60 MB paraphrase table.
_METEOR_TIMEOUT_BASE_S = 300.0
_METEOR_TIMEOUT_PER_ITEM_S = 0.05


def _package_dir() -> Path:
    import pycocoevalcap.bleu.bleu as bleu_module  # pycocoevalcap is a namespace package: no __file__

    return Path(bleu_module.__file__).resolve().parent.parent


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise SafeError(JAVA_MISSING)
    return java


# ----------------------------------------------------------------------------------------------
# Input alignment
# ----------------------------------------------------------------------------------------------

def _as_reference_list(refs, key) -> list[str]:
    if isinstance(refs, str):
        refs = [refs]  # one reference given as a bare string
    if not isinstance(refs, Sequence) or not all(isinstance(r, str) for r in refs):
        raise SafeError(f"references for {key!r} must be a list of strings, got {refs!r:.80}.")
    return list(refs)


def _align(predictions, references) -> tuple[list[Hashable], list[str], list[list[str]]]:
    """Return (ids, prediction per id, reference list per id) in prediction order."""
    if isinstance(predictions, Mapping):
        if not isinstance(references, Mapping):
            raise SafeError("predictions is a dict (id -> caption), so references must be a dict "
                            "(id -> list of reference captions) too.")
        ids = list(predictions)
        missing = [i for i in ids if i not in references]
        if missing:
            raise SafeError(f"{len(missing)} prediction id(s) have no references (first: "
                            f"{missing[:5]!r}); use the same ids (and id type) in both dicts.")
        preds = [predictions[i] for i in ids]
        refs = [references[i] for i in ids]
    elif isinstance(predictions, Sequence) and not isinstance(predictions, str):
        if isinstance(references, Mapping) or not isinstance(references, Sequence):
            raise SafeError("predictions is a list, so references must be a list of reference "
                            "lists aligned with it.")
        if len(references) != len(predictions):
            raise SafeError(f"got {len(predictions)} predictions but {len(references)} reference "
                            f"lists; they must be aligned one to one.")
        ids, preds, refs = list(range(len(predictions))), list(predictions), list(references)
    else:
        raise SafeError("predictions must be a dict (id -> caption) or a list of captions.")
    if not ids:
        raise SafeError("caption_metrics() got no predictions; evaluate at least one caption.")
    for key, pred in zip(ids, preds):
        if not isinstance(pred, str):
            raise SafeError(f"the prediction for {key!r} must be a string, got "
                            f"{type(pred).__name__}.")
    return ids, preds, [_as_reference_list(r, k) for k, r in zip(ids, refs)]


# ----------------------------------------------------------------------------------------------
# PTB tokenization (the jar and punctuation list of pycocoevalcap's PTBTokenizer)
# ----------------------------------------------------------------------------------------------

def _one_line(text: str) -> str:
    # str.split() also splits on \r, U+2028, U+0085... which Java would treat as line breaks.
    return " ".join(text.split())


def ptb_tokenize(sentences: list[str]) -> list[str]:
    """Tokenize sentences with the Stanford PTB tokenizer as the COCO tooling does; one output
    per input, lowercased, with pycocoevalcap's punctuation tokens removed."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    java = _require_java()
    if not sentences:
        return []
    lines = [_one_line(s) for s in sentences]
    jar = _package_dir() / "tokenizer" / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    fd, tmp_name = tempfile.mkstemp(prefix="safe_ptb_", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        cmd = [java, "-Dfile.encoding=UTF-8", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", "-encoding", "UTF-8", tmp_name]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    finally:
        os.unlink(tmp_name)
    if proc.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer failed (exit {proc.returncode}): "
                           f"{proc.stderr.decode('utf-8', 'replace')[-500:]}")
    out_lines = proc.stdout.decode("utf-8", "replace").split("\n")
    if out_lines and out_lines[-1] == "":
        out_lines.pop()
    if len(out_lines) != len(lines):
        raise RuntimeError(f"the PTB tokenizer returned {len(out_lines)} lines for {len(lines)} "
                           f"captions; refusing to score misaligned captions.")
    drop = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in drop) for line in out_lines]


# ----------------------------------------------------------------------------------------------
# Scorers
# ----------------------------------------------------------------------------------------------

def _meteor_class():
    from pycocoevalcap.meteor import meteor as meteor_module

    class ClosingMeteor(meteor_module.Meteor):
        """pycocoevalcap's Meteor with a watchdog-friendly start and a close that cannot hang.

        The parent's __del__ takes a lock that compute_score leaves held if the Java process died
        mid-read; that would hang garbage collection, so close()/__del__ never take it. stderr goes
        to DEVNULL because an unread pipe could fill up and block Java.
        """

        def __init__(self, java: str):  # noqa: D107 - replaces the parent's Popen call
            jar_dir = Path(meteor_module.__file__).resolve().parent
            self.meteor_cmd = [java, "-Dfile.encoding=UTF-8", "-Xmx2G", "-jar",
                               meteor_module.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
            self.meteor_p: subprocess.Popen | None = subprocess.Popen(
                self.meteor_cmd, cwd=jar_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self.lock = threading.Lock()

        def close(self) -> None:
            proc = getattr(self, "meteor_p", None)
            if proc is None:
                return
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self.meteor_p = None

        def __del__(self):
            self.close()

    return ClosingMeteor


def _meteor_score(java: str, gts: dict, res: dict) -> float:
    meteor = _meteor_class()(java)
    timeout = _METEOR_TIMEOUT_BASE_S + _METEOR_TIMEOUT_PER_ITEM_S * len(gts)
    # If METEOR stops answering, killing it makes the blocked readline return EOF (then a ValueError).
    watchdog = threading.Timer(timeout, meteor.meteor_p.kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        score, _ = meteor.compute_score(gts, res)
    except (ValueError, OSError) as exc:
        raise RuntimeError(f"METEOR failed or timed out after {timeout:.0f} s: {exc}") from exc
    finally:
        watchdog.cancel()
        meteor.close()
    return float(score)


def spice_jars_present() -> bool:
    from safe.eval.spice import corenlp_dir

    return corenlp_dir() is not None


def _spice_score(java: str, gts: dict, res: dict) -> tuple[float | None, str | None]:
    """SPICE (0-1), or (None, reason) when its jars are missing or it fails; never downloads anything."""
    from safe.eval.spice import spice_score

    return spice_score(java, gts, res)


def caption_metrics(predictions, references, cider_only: bool = False, per_item: bool = False) -> dict:
    """Corpus-level captioning metrics on the 0-100 scale.

    predictions: dict id -> caption, or a list of captions.
    references:  dict id -> list of reference captions (every id of predictions must be there;
                 extra ids are ignored), or a list of reference lists aligned with predictions.
    Returns {"bleu_1".."bleu_4", "meteor", "rouge_l", "cider", "spice", "spider", "n", "note"};
    spice/spider are None (and note explains) when SPICE cannot run, note is None otherwise.
    cider_only=True computes just {"cider", "n"} (the muted control needs no more, and METEOR's start-up
    is most of the cost). per_item=True adds "cider_per_item": {id: CIDEr-D of that item}, from the same call
    (the same IDF), so their mean is the corpus CIDEr-D and two runs on the same references can be compared
    item by item (the paired bootstrap of the listening gain).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    java = _require_java()
    ids, preds, refs = _align(predictions, references)

    # Tokenize everything in one Java call; blank captions become the placeholder first so the
    # tokenizer never sees an empty line.
    flat = [p if p.strip() else EMPTY_PLACEHOLDER for p in preds]
    ref_slices = []
    for key, ref_list in zip(ids, refs):
        kept = [r for r in ref_list if r.strip()]
        if not kept:
            raise SafeError(f"every reference caption for {key!r} is empty; give at least one.")
        ref_slices.append((len(flat), len(flat) + len(kept)))
        flat.extend(kept)
    tokens = [t.replace("|||", " ").strip() for t in ptb_tokenize(flat)]

    # Internal integer keys: pycocoevalcap sorts/iterates keys and our ids may be anything.
    res = {i: [tokens[i] or EMPTY_PLACEHOLDER] for i in range(len(ids))}
    gts = {}
    for i, (start, stop) in enumerate(ref_slices):
        kept = [t for t in tokens[start:stop] if t]
        if not kept:
            raise SafeError(f"every reference caption for {ids[i]!r} is empty after tokenization "
                            f"(punctuation only); give at least one real reference.")
        gts[i] = kept

    cider, cider_items = Cider().compute_score(gts, res)  # one call over the whole set: IDF from all refs
    items = {"cider_per_item": {key: 100.0 * float(v) for key, v in zip(ids, cider_items)}} if per_item else {}
    if cider_only:
        return {"cider": 100.0 * float(cider), "n": len(ids), **items}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    meteor = _meteor_score(java, gts, res)
    spice, note = _spice_score(java, gts, res)

    result: dict[str, float | int | str | None] = {f"bleu_{k + 1}": 100.0 * float(bleu[k]) for k in range(4)}
    result.update(meteor=100.0 * meteor, rouge_l=100.0 * float(rouge), cider=100.0 * float(cider))
    result["spice"] = None if spice is None else 100.0 * spice
    result["spider"] = None if spice is None else (100.0 * float(cider) + 100.0 * spice) / 2.0
    result["n"] = len(ids)
    result["note"] = note
    return {**result, **items}

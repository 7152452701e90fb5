"""SPICE (and so SPIDEr) with pycocoevalcap's spice-1.0.jar and the Stanford CoreNLP 3.6.0 jars it needs.

The CoreNLP jars are looked for in the user cache that `safe metrics fetch-spice` fills (`$SAFE_CACHE_DIR/spice`,
default `~/.cache/safe/spice`), then in pycocoevalcap's own `spice/lib`. The jar is run here rather than through
pycocoevalcap's `Spice` class because that class downloads ~400 MB unasked and unchecked when the jars are
missing, writes its temp files into the installed package, and passes `-cache`, whose LMDB/FST layer fails on
Java 9+ ("InaccessibleObjectException ... java.lang.String.value"). Without `-cache` SPICE parses every caption
afresh: slower, the same scores. The score is pycocoevalcap's: the mean over items of SPICE's "All" F-score.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from pathlib import Path

from safe.core.cache import cache_dir

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_MAIN = "edu.anu.spice.SpiceScorer"
JAVA_MEMORY = "-Xmx8G"  # as pycocoevalcap: the CoreNLP parser and its models need several GB
_TIMEOUT_BASE_S = 600.0
_TIMEOUT_PER_ITEM_S = 1.0


def user_jar_dir() -> Path:
    return cache_dir("spice")


def package_spice_dir() -> Path:
    import pycocoevalcap.bleu.bleu as bleu_module  # pycocoevalcap is a namespace package: no __file__

    return Path(bleu_module.__file__).resolve().parent.parent / "spice"


def corenlp_dir() -> Path | None:
    """The first folder holding both CoreNLP jars: the user cache, then pycocoevalcap's spice/lib."""
    for folder in (user_jar_dir(), package_spice_dir() / "lib"):
        if all((folder / name).is_file() for name in CORENLP_JARS):
            return folder
    return None


def missing_note() -> str:
    return ("SPICE and SPIDEr are null: the Stanford CoreNLP 3.6.0 jars (" + ", ".join(CORENLP_JARS) + ") are in "
            f"neither {user_jar_dir()} nor {package_spice_dir() / 'lib'}; run `safe metrics fetch-spice`.")


def command(java: str, corenlp: Path, in_file: str, out_file: str) -> list[str]:
    """The SPICE command line: spice-1.0.jar, its bundled libraries and the CoreNLP jars on an explicit classpath."""
    spice_dir = package_spice_dir()
    bundled = sorted(p for p in (spice_dir / "lib").glob("*.jar") if p.name not in CORENLP_JARS)
    jars = [spice_dir / "spice-1.0.jar", *(corenlp / name for name in CORENLP_JARS), *bundled]
    return [java, JAVA_MEMORY, "-cp", os.pathsep.join(map(str, jars)), SPICE_MAIN, in_file, "-out", out_file,
            "-subset", "-silent"]


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def spice_score(java: str, gts: dict, res: dict) -> tuple[float | None, str | None]:
    """Mean SPICE F-score (0-1) over the items, or (None, why) when the jars are missing or SPICE fails."""
    corenlp = corenlp_dir()
    if corenlp is None:
        return None, missing_note()
    items = [{"image_id": key, "test": res[key][0], "refs": gts[key]} for key in sorted(gts)]
    with tempfile.TemporaryDirectory(prefix="safe_spice_") as tmp:
        in_file, out_file = os.path.join(tmp, "input.json"), os.path.join(tmp, "output.json")
        with open(in_file, "w", encoding="utf-8") as handle:
            json.dump(items, handle)
        timeout = _TIMEOUT_BASE_S + _TIMEOUT_PER_ITEM_S * len(items)
        try:
            proc = subprocess.run(command(java, corenlp, in_file, out_file), cwd=tmp, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"SPICE and SPIDEr are null: SPICE did not finish within {timeout:.0f} s."
        except OSError as exc:
            return None, f"SPICE and SPIDEr are null: SPICE could not start ({exc})."
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
            cause = next((line.strip() for line in lines if "Exception" in line or "Error" in line),
                         lines[-1] if lines else "")
            return None, f"SPICE and SPIDEr are null: SPICE failed (exit {proc.returncode}: {cause[:300]})."
        try:
            with open(out_file, encoding="utf-8") as handle:
                results = json.load(handle)
        except (OSError, ValueError) as exc:
            return None, f"SPICE and SPIDEr are null: SPICE wrote no readable result ({exc})."
    scores = [_as_float(item["scores"]["All"]["f"]) for item in results]
    mean = sum(scores) / len(scores) if scores else math.nan
    if len(scores) != len(items) or not math.isfinite(mean):
        return None, f"SPICE and SPIDEr are null: SPICE scored {len(scores)} of {len(items)} items or gave NaN."
    return mean, None

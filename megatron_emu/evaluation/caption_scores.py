"""COCO caption metrics with the COCO caption evaluation's own scorers (pycocoevalcap).

- CIDEr (CIDEr-D: IDF from the evaluated set's references, as the official code) and
  BLEU-1..4: pure Python, always run;
- METEOR: the Java METEOR 1.5 shipped in pycocoevalcap, run only when `java` is found;
- SPICE: Java too, and it needs Stanford CoreNLP's jars, which pycocoevalcap fetches from
  the network on first use: run only when they are already in place (nothing is downloaded).
Tokenisation: the official Stanford PTBTokenizer (Java, shipped in pycocoevalcap) when `java`
is found, otherwise its closest pure-Python stand-in (lower case, PTB punctuation dropped);
the result names the one used, since CIDEr depends on it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil

# The tokens the official tokenizer drops after PTB tokenisation.
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}


def java_available() -> bool:
    return shutil.which("java") is not None


def spice_ready() -> bool:
    """SPICE's jar and the CoreNLP jars it loads are present (pycocoevalcap would download them)."""
    if not java_available():
        return False
    from pycocoevalcap import spice

    lib = os.path.join(os.path.dirname(spice.__file__), "lib")
    return os.path.isdir(lib) and any(name.startswith("stanford-corenlp-3.6.0") for name in os.listdir(lib))


def python_tokenize(text: str) -> str:
    """Lower case; words, numbers and clitics split as PTB would; its punctuation dropped."""
    tokens = re.findall(r"n't|'\w+|\w+(?=n't)|[\w-]+|[^\w\s]", text.lower().replace("\n", " "))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and t.strip("-"))


def tokenize(captions: dict[str, list[str]], use_java: bool) -> tuple[dict[str, list[str]], str]:
    """{id: [captions]} -> ({id: [tokenised captions]}, the tokeniser's name)."""
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        raw = {key: [{"caption": c} for c in texts] for key, texts in captions.items()}
        return PTBTokenizer().tokenize(raw), "Stanford PTBTokenizer (CoreNLP 3.4.1, pycocoevalcap)"
    return {key: [python_tokenize(c) for c in texts] for key, texts in captions.items()}, \
        "python PTB-like tokeniser (java not found or not used)"


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]], use_java: bool | None = None) -> dict:
    """-> {"corpus": {metric: value}, "per_sample": {id: {metric: value}}, "tokenizer", "scorers", "skipped"}.
    Values on pycocoevalcap's scale (CIDEr 1.124 is the paper's 112.4). use_java: None = when found."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    java = java_available() if use_java is None else use_java and java_available()

    keys = sorted(predictions)
    missing = [k for k in keys if not references.get(k)]
    if missing:
        raise ValueError(f"caption {missing[0]}: no reference captions")
    # one tokeniser call (one JVM start) for references and predictions
    both = {**{("ref", k): references[k] for k in keys}, **{("pred", k): [predictions[k]] for k in keys}}
    tokens, tokenizer = tokenize(both, java)
    refs, preds = {k: tokens[("ref", k)] for k in keys}, {k: tokens[("pred", k)] for k in keys}
    corpus, per_sample = {}, {k: {} for k in keys}
    scorers, skipped = [("CIDEr", Cider()), ("BLEU", Bleu(4))], {}
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.append(("METEOR", Meteor()))
    else:
        skipped["METEOR"] = "no java found" if use_java is not False else "java not used"
    if java and spice_ready():
        from pycocoevalcap.spice.spice import Spice

        scorers.append(("SPICE", Spice()))
    else:
        skipped["SPICE"] = ("java not used" if not java else
                            "Stanford CoreNLP 3.6.0 jars missing from pycocoevalcap/spice/lib (not downloaded)")
    for name, scorer in scorers:
        with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its n-gram counts
            total, each = scorer.compute_score(refs, preds)
        if name == "BLEU":  # BLEU-1..4 corpus values; per sample BLEU-4
            corpus.update({f"BLEU-{n + 1}": float(v) for n, v in enumerate(total)})
            each, name = each[3], "BLEU-4"
        else:
            corpus[name] = float(total)
        if name == "SPICE":
            each = [s["All"]["f"] for s in each]
        for key, value in zip(keys, each):
            per_sample[key][name] = float(value)
    return {"corpus": corpus, "per_sample": per_sample, "tokenizer": tokenizer,
            "scorers": [n for n, _ in scorers], "skipped": skipped}

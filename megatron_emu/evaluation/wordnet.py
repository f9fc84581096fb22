"""WordNet 3.0 from a local directory, for NExT-QA's WUPS (nothing is downloaded).

    wn = load_wordnet("/usr/share/wordnet")   # a WordNet dict/ directory: index.noun, data.noun, ...
    wn = load_wordnet("")                     # nltk's corpora/wordnet under NLTK_DATA / nltk.data.path
                                              # (a directory is read as above; wordnet.zip by nltk.corpus.wordnet)

The directory is read by nltk's own WordNetCorpusReader (the reader NExT-OE's eval_oe.py uses
through `nltk.corpus.wordnet`), with two local-path adjustments:
- nltk >= 3.9 only opens files under nltk.data.path: the directory the user named is added there;
- its OMW version mapping (map_wn) would look up nltk's downloadable `wordnet` corpus; WUPS uses
  English synsets only, so no mapping is built.
Debian's `wordnet-base` package (/usr/share/wordnet) ships WordNet 3.0 without `lexnames`, the
fixed list of lexicographer files; WordNet 3.0's list (lexnames(5WN)) is used when it is absent.
"""

from __future__ import annotations

import functools
import io
import os
import warnings

# WordNet 3.0's lexicographer files, by number (lexnames(5WN)): name, syntactic category.
LEXNAMES_30 = (
    [("adj.all", 3), ("adj.pert", 3), ("adv.all", 4)]
    + [(f"noun.{n}", 1) for n in ("Tops act animal artifact attribute body cognition communication event feeling "
                                   "food group location motive object person phenomenon plant possession process "
                                   "quantity relation shape state substance time").split()]
    + [(f"verb.{n}", 2) for n in ("body change cognition communication competition consumption contact creation "
                                   "emotion motion perception possession social stative weather").split()]
    + [("adj.ppl", 3)]
)
REQUIRED = ("index.noun", "data.noun", "index.verb", "data.verb", "index.adj", "data.adj", "index.adv", "data.adv")
HELP = ("WordNet 3.0 is needed for NExT-QA's WUPS: give --wordnet-dir (a WordNet dict/ directory with index.noun, "
        "data.noun, ...; e.g. Debian's wordnet-base: /usr/share/wordnet) or put nltk's corpora/wordnet under "
        "NLTK_DATA; nothing is downloaded")


def _reader_class():
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class LocalWordNet(WordNetCorpusReader):
        def __init__(self, root: str):
            self._dict_dir = root
            with warnings.catch_warnings():  # "multilingual functions are not available": not used here
                warnings.simplefilter("ignore")
                super().__init__(root, None)

        def open(self, fileid):
            if fileid == "lexnames" and not os.path.exists(os.path.join(self._dict_dir, "lexnames")):
                return io.StringIO("".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(LEXNAMES_30)))
            return super().open(fileid)

        def map_wn(self, version="wordnet"):
            return None  # no OMW version mapping (it would load nltk's downloadable corpus)

    return LocalWordNet


@functools.lru_cache(maxsize=4)
def load_wordnet(wordnet_dir: str = ""):
    """A WordNet reader (nltk's WordNetCorpusReader interface) from `wordnet_dir`, else from nltk's data path."""
    import nltk

    if not wordnet_dir:
        try:
            found = nltk.data.find("corpora/wordnet")  # a directory, or inside corpora/wordnet.zip
        except LookupError:
            raise ValueError(f"--wordnet-dir (none): {HELP}") from None
        if not isinstance(found, nltk.data.FileSystemPathPointer):  # the zip: nltk's own loader reads it
            from nltk.corpus import wordnet

            wordnet.ensure_loaded()
            return wordnet
        wordnet_dir = found.path
    root = os.path.abspath(wordnet_dir)
    missing = [name for name in REQUIRED if not os.path.isfile(os.path.join(root, name))]
    if missing:
        raise ValueError(f"--wordnet-dir {wordnet_dir}: not a WordNet dict/ directory (no {', '.join(missing)}); {HELP}")
    if root not in nltk.data.path:
        nltk.data.path.append(root)  # nltk >= 3.9 opens corpus files only under its data path
    try:
        return _reader_class()(root)
    except Exception as e:  # nltk raises WordNetError / AssertionError / ValueError for a malformed database
        raise ValueError(f"--wordnet-dir {wordnet_dir}: unreadable WordNet database ({e.__class__.__name__}: {e})") \
            from None

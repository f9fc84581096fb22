"""A tiny WordNet 3.0 database in the real file formats (wndb(5WN), lexnames(5WN), morph exceptions),
written by the tests: nltk's WordNetCorpusReader reads it like Princeton's dict/ directory.

Nouns (hypernym tree, depth from entity):
    entity(0) -> organism(1) -> animal(2) -> dog/hound(3) -> puppy(4)
                                          -> cat(3)
              -> artifact(1) -> toy(2) -> ball(3)
Verbs: play (a root of its own), sit. Exception lists: verb "sat" -> sit (noun.exc: "mice mouse", no synset).
"""

from __future__ import annotations

import os

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by\n" \
         "  2 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.\n"
LEXNAMES = [("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1),
            ("noun.animal", 1), ("noun.artifact", 1), ("verb.body", 2)]
# name -> (lexname index, words, hypernym name or None, gloss)
NOUNS = {
    "entity": (3, ["entity"], None, "that which exists"),
    "organism": (3, ["organism"], "entity", "a living thing"),
    "animal": (5, ["animal"], "organism", "a living organism that moves"),
    "dog": (5, ["dog", "hound"], "animal", "a domestic canine"),
    "puppy": (5, ["puppy"], "dog", "a young dog"),
    "cat": (5, ["cat"], "animal", "a small feline"),
    "artifact": (6, ["artifact"], "entity", "a man-made object"),
    "toy": (6, ["toy"], "artifact", "a thing to play with"),
    "ball": (6, ["ball"], "toy", "a round object"),
}
VERBS = {
    "play": (7, ["play"], None, "engage in a game"),
    "sit": (7, ["sit"], None, "be seated"),
}


def _data_file(synsets: dict, pos: str) -> tuple[str, dict[str, int]]:
    """data.<pos>: one line per synset starting with its own byte offset (8 digits)."""
    offsets, lines, at = {}, [], len(HEADER.encode())
    for name, (_lex, words, _hyper, gloss) in synsets.items():  # a line's length does not depend on its offsets
        offsets[name] = at
        at += len(_synset_line(name, synsets, pos, {n: 0 for n in synsets}).encode())
    for name in synsets:
        lines.append(_synset_line(name, synsets, pos, offsets))
    return HEADER + "".join(lines), offsets


def _synset_line(name: str, synsets: dict, pos: str, offsets: dict) -> str:
    lex, words, hyper, gloss = synsets[name]
    pointers = ([f"@ {offsets[hyper]:08d} {pos} 0000"] if hyper else []) + \
        [f"~ {offsets[child]:08d} {pos} 0000" for child, s in synsets.items() if s[2] == name]
    frames = " 01 + 02 00" if pos == "v" else ""  # verbs: one sentence frame
    word_fields = " ".join(f"{w} 0" for w in words)
    return f"{offsets[name]:08d} {lex:02d} {pos} {len(words):02x} {word_fields} {len(pointers):03d} " \
           f"{' '.join(pointers)}{' ' if pointers else ''}{frames.strip() + ' ' if frames else ''}| {gloss}  \n"


def _index_file(synsets: dict, pos: str, offsets: dict) -> str:
    """index.<pos>: lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt offsets, sorted."""
    senses: dict[str, list[str]] = {}
    for name, (_lex, words, _hyper, _gloss) in synsets.items():
        for w in words:
            senses.setdefault(w, []).append(name)
    lines = []
    for lemma in sorted(senses):
        names = senses[lemma]
        symbols = sorted({"@" for n in names if synsets[n][2]} | {"~" for n in names
                                                                  if any(s[2] == n for s in synsets.values())})
        lines.append(f"{lemma} {pos} {len(names)} {len(symbols)} {' '.join(symbols)}{' ' if symbols else ''}"
                     f"{len(names)} 0 {' '.join(f'{offsets[n]:08d}' for n in names)}  \n")
    return HEADER + "".join(lines)


def write_wordnet(directory: str, with_lexnames: bool = True) -> str:
    """The database under `directory` (created); with_lexnames=False: Debian wordnet-base's layout."""
    os.makedirs(directory, exist_ok=True)
    files = {"noun.exc": "mice mouse\n", "verb.exc": "sat sit\n", "adj.exc": "", "adv.exc": ""}
    for pos, suffix, synsets in (("n", "noun", NOUNS), ("v", "verb", VERBS), ("a", "adj", {}), ("r", "adv", {})):
        data, offsets = _data_file(synsets, pos)
        files[f"data.{suffix}"] = data
        files[f"index.{suffix}"] = _index_file(synsets, pos, offsets)
    if with_lexnames:
        files["lexnames"] = "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(LEXNAMES))
    for name, text in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return directory

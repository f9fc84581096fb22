"""WUPS of open-ended NExT-QA answers (NExT-OE), as its official eval_oe.py / metrics.py score them.

The Wu-Palmer similarity set (WUPS, Malinowski & Fritz 2014) in NExT-OE's form:
- both answers are normalised first (`remove_stop`): tokenised, each token lower-cased and
  lemmatised (pywsd's lemmatize_sentence: WordNet's morphy for the token's tagged part of speech;
  a lemma that is not in WordNet falls back to the Porter stem when that is, else the token), then
  NExT-OE's stopwords dropped;
- counting and binary questions (types DC, DB) score exact match of the normalised answers;
- the others: wup(a, b) = 1 for the same word, else the Wu-Palmer similarity of the first synset
  of each (`synsets(word)`, every part of speech, nouns first; 0 when either has none), times 0.1
  when below the threshold (0 for WUPS@0, 0.9 for WUPS@0.9); for answers A, B the product over
  the words of A of their best match in B, a word with no match (0) skipped, 0 if none matched;
  WUPS = min(that for A->B, for B->A);
- a question with an additional reference answer (add_reference_answer_*.json) takes the max.
The headline "WUPS" is WUPS@0 averaged over all questions (NExT-OE's `WUPS` column; the Emu paper
names no threshold); WUPS@0.9 and the groups WUPS_C / WUPS_T / WUPS_D (causal, temporal,
descriptive questions, at threshold 0) are reported beside it.

Part-of-speech tags come from nltk's perceptron tagger when its model is on nltk's data path
(NLTK_DATA); it is a download, so without it a token is taken as a verb when it ends in -ed / -ing
and WordNet knows a verb base form for it, else as a noun (the tagger's default for an untagged
word). `AnswerScorer.tagger_name` says which ran; the JSON records it.
"""

from __future__ import annotations

# NExT-OE's stopword list "tailored for NExT-QA" (its stopwords.txt, as lmms-eval ships it for its
# NExT-QA task): nltk's English stopwords without the spatial, temporal, quantity and negation words
# (in, on, up, before, after, more, no, not, ...), which carry the answer in NExT-QA.
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
that that'll these those am is are was were be been being have has had having do does did doing a an the and but
if or because as until while to from of at for with about into through during again further then here there when
where why how all any each most other some such only own so than too very s t can will just don don't should
should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
weren weren't won won't wouldn wouldn't
""".split())
EXACT_MATCH_TYPES = ("DC", "DB")  # descriptive counting / binary: exact match, no WordNet
PENN_TO_WORDNET = {"NN": "n", "JJ": "a", "VB": "v", "RB": "r"}


def load_tagger():
    """nltk's perceptron POS tagger from nltk's data path, or None when its model is not there."""
    from nltk.tag import PerceptronTagger

    try:
        return PerceptronTagger()
    except (LookupError, OSError):
        return None


def tokenize(text: str) -> list[str]:
    """nltk's word_tokenize on one line (no sentence splitter: that needs punkt, a download)."""
    from nltk.tokenize import word_tokenize

    return word_tokenize(text, preserve_line=True)


class AnswerScorer:
    """WUPS of (prediction, reference) pairs over one WordNet (wordnet.load_wordnet)."""

    def __init__(self, wordnet, tagger=None):
        from nltk.stem import PorterStemmer

        self.wn, self.tagger, self.stemmer = wordnet, tagger, PorterStemmer()
        self.tagger_name = "nltk averaged perceptron" if tagger is not None else "untagged: -ed/-ing verbs, else nouns"
        self._first_synset: dict[str, object] = {}

    # --- normalisation (NExT-OE's remove_stop) ---
    def _wordnet_pos(self, token: str, tag: str | None) -> str:
        if tag is not None and tag[:2] in PENN_TO_WORDNET:
            return PENN_TO_WORDNET[tag[:2]]
        if self.tagger is not None:  # pywsd tags such a token again on its own, nouns by default
            return PENN_TO_WORDNET.get(self.tagger.tag([token])[0][1][:2], "n")
        return "v" if token.endswith(("ed", "ing")) and self.wn._morphy(token, "v") else "n"

    def lemma(self, token: str, tag: str | None = None) -> str:
        word = token.lower()
        forms = self.wn._morphy(word, self._wordnet_pos(word, tag))
        lemma = min(forms, key=len) if forms else word  # nltk's WordNetLemmatizer
        if self.wn.synsets(lemma):
            return lemma
        stem = self.stemmer.stem(word)
        return stem if self.wn.synsets(stem) else word

    def normalise(self, text: str) -> str:
        tokens = tokenize(str(text))
        tags = [t for _, t in self.tagger.tag(tokens)] if self.tagger is not None else [None] * len(tokens)
        return " ".join(w for w in (self.lemma(t, tag) for t, tag in zip(tokens, tags)) if w not in STOPWORDS)

    # --- Wu-Palmer similarity set ---
    def first_synset(self, word: str):
        if word not in self._first_synset:
            synsets = self.wn.synsets(word)
            self._first_synset[word] = synsets[0] if synsets else None
        return self._first_synset[word]

    def wup(self, word1: str, word2: str, threshold: float) -> float:
        if word1 == word2:
            return 1.0
        s1, s2 = self.first_synset(word1), self.first_synset(word2)
        if s1 is None or s2 is None:
            return 0.0
        similarity = s1.wup_similarity(s2) or 0.0  # None: no common subsumer
        return similarity * 0.1 if similarity < threshold else similarity

    def one_way(self, words1: list[str], words2: list[str], threshold: float) -> float:
        product, matched = 1.0, False
        for w1 in words1:
            best = max((self.wup(w1, w2, threshold) for w2 in words2), default=0.0)
            if best > 0:  # a word nothing matches is skipped, not a zero factor
                product, matched = product * best, True
        return product if matched else 0.0

    def wups(self, prediction: str, reference: str, threshold: float) -> float:
        """Of two normalised answers."""
        a, b = tokenize(prediction), tokenize(reference)
        return min(self.one_way(a, b, threshold), self.one_way(b, a, threshold))

    def score(self, prediction: str, references: list[str], question_type: str) -> dict[str, float]:
        """-> {"WUPS": WUPS@0, "WUPS@0.9", "WUPS_<C|T|D>"} of one question (max over its references)."""
        predicted = self.normalise(prediction)
        truths = [self.normalise(r) for r in references]
        if question_type in EXACT_MATCH_TYPES:
            at0 = at9 = float(any(predicted == t for t in truths))
        else:
            at0 = max(self.wups(predicted, t, 0.0) for t in truths)
            at9 = max(self.wups(predicted, t, 0.9) for t in truths)
        return {"WUPS": at0, "WUPS@0.9": at9, f"WUPS_{question_type[:1]}": at0}

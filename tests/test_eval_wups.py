"""Open-ended NExT-QA's WUPS (evaluation/wups.py) over a tiny WordNet written in the real file
formats (tests/wordnet_fixture.py), against hand-computed Wu-Palmer values, and its readers.

Wu-Palmer as nltk computes it: 2 d / (l1 + l2), d = depth of the lowest common subsumer counted
from 1 at the root, l_i = d + the steps from synset i up to it. In the fixture's tree
(entity -> organism -> animal -> dog -> puppy; animal -> cat; entity -> artifact -> toy -> ball):
    dog, cat:    subsumer animal, d = 3, l = 4, 4  -> 6 / 8  = 0.75
    dog, ball:   subsumer entity, d = 1, l = 4, 4  -> 2 / 8  = 0.25
    dog, animal: subsumer animal, d = 3, l = 4, 3  -> 6 / 7
    puppy, cat:  subsumer animal, d = 3, l = 5, 4  -> 6 / 9
    play (a verb root), dog: nltk's simulated root above both, d = 1, l = 2, 5 -> 2 / 7
"""

import csv
import json
import os

import pytest

from megatron_emu.evaluation.video_files import read_next_oe
from megatron_emu.evaluation.wordnet import load_wordnet
from megatron_emu.evaluation.wups import AnswerScorer
from tests import eval_fixtures as fx
from tests.wordnet_fixture import write_wordnet

pytest.importorskip("nltk")


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return AnswerScorer(load_wordnet(write_wordnet(str(tmp_path_factory.mktemp("wn") / "dict"))))


@pytest.mark.parametrize("a, b, expected", [("dog", "cat", 0.75), ("dog", "ball", 0.25), ("dog", "animal", 6 / 7),
                                            ("puppy", "cat", 6 / 9), ("play", "dog", 2 / 7), ("dog", "hound", 1.0),
                                            ("dog", "xyzzy", 0.0)])
def test_wu_palmer_of_first_synsets_matches_the_hand_computed_values(scorer, a, b, expected):
    assert scorer.wup(a, b, 0.0) == pytest.approx(expected)
    assert scorer.wup(a, b, 0.9) == pytest.approx(expected if expected >= 0.9 else 0.1 * expected)


def test_wups_of_multi_word_answers_is_the_smaller_of_the_two_products(scorer):
    # dog ball -> cat: 0.75 * 0.25; cat -> dog ball: max(0.75, 0.25) = 0.75; min = 0.1875
    assert scorer.wups("dog ball", "cat", 0.0) == pytest.approx(0.1875)
    assert scorer.wups("dog ball", "cat", 0.9) == pytest.approx(0.075 * 0.025)
    # a word WordNet lacks matches nothing and is skipped, not a zero factor
    assert scorer.wups("xyzzy dog", "dog", 0.0) == 1.0
    assert scorer.wups("xyzzy", "dog", 0.0) == 0.0 and scorer.wups("", "dog", 0.0) == 0.0


def test_answers_are_lemmatised_and_stripped_of_next_qa_stopwords(scorer):
    assert scorer.normalise("The Dogs") == "dog"  # stopword, lower case, plural
    assert scorer.normalise("playing with a ball") == "play ball"  # untagged -ing verb; "with", "a" dropped
    assert scorer.normalise("sat on the puppies") == "sat on puppy"  # untagged "sat": a noun form; "on" is kept
    assert scorer.wup("sat", "sit", 0.9) == 1.0  # ... whose first synset, through verb.exc, is sit's
    assert scorer.normalise("balls in hi") == "ball in hi"  # "in" kept (spatial); unknown word unchanged
    assert "untagged" in scorer.tagger_name


def test_question_score_per_type_and_reference(scorer):
    assert scorer.score("a cat", ["the dog"], "CW") == pytest.approx({"WUPS": 0.75, "WUPS@0.9": 0.075, "WUPS_C": 0.75})
    # counting / binary questions: exact match of the normalised answers, no WordNet
    assert scorer.score("the two", ["two"], "DC") == {"WUPS": 1.0, "WUPS@0.9": 1.0, "WUPS_D": 1.0}
    assert scorer.score("three", ["two"], "DC")["WUPS"] == 0.0
    # a second reference answer: the better of the two
    assert scorer.score("cat", ["ball", "puppy"], "TN") == pytest.approx(
        {"WUPS": 6 / 9, "WUPS@0.9": 0.1 * 6 / 9, "WUPS_T": 6 / 9})


def test_wordnet_directory_without_lexnames_and_one_line_errors(tmp_path, monkeypatch):
    wn = load_wordnet(write_wordnet(str(tmp_path / "debian"), with_lexnames=False))  # Debian wordnet-base's layout
    assert wn.synsets("cat")[0].lexname() == "noun.animal"
    with pytest.raises(ValueError, match=r"--wordnet-dir .*nowhere: not a WordNet dict/ directory \(no index.noun"):
        load_wordnet(str(tmp_path / "nowhere"))
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    with pytest.raises(ValueError, match=r"^--wordnet-dir \(none\): WordNet 3.0 is needed for NExT-QA's WUPS"):
        load_wordnet.__wrapped__("")
    write_wordnet(str(tmp_path / "nltk_data" / "corpora" / "wordnet"))  # nltk's data layout (NLTK_DATA)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    found = load_wordnet.__wrapped__("")
    assert found.synsets("puppy")[0].wup_similarity(found.synsets("cat")[0]) == pytest.approx(6 / 9)


def test_next_oe_reader_keeps_types_and_second_answers(tmp_path):
    files = fx.next_oe(str(tmp_path), 4)
    samples = read_next_oe(files["annotations"], files["video_dir"], files["video_map"], files["extra_answers"])
    assert [s.key for s in samples] == ["5000_0", "5001_1", "5002_2", "5003_3"]
    assert [s.question_type for s in samples] == ["CW", "TN", "DC", "DO"]
    assert samples[3].references == ["a puppy", "dog"] and samples[0].references == ["the ball"]
    assert samples[0].visual.endswith(os.path.join("0001", "5000"))
    rows = list(csv.DictReader(open(files["annotations"])))
    rows[1]["type"] = "TP"  # eval_oe.py counts TP questions as TN
    rows[2]["type"] = "XX"
    for name, edit in (("tp.csv", rows[:2]), ("bad.csv", rows[:3])):
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(edit)
    assert read_next_oe(str(tmp_path / "tp.csv"), files["video_dir"], files["video_map"])[1].question_type == "TN"
    with pytest.raises(ValueError, match="question 5002_2 has type 'XX'"):
        read_next_oe(str(tmp_path / "bad.csv"), files["video_dir"], files["video_map"])
    mc = fx.nextqa(str(tmp_path), 1)
    with pytest.raises(ValueError, match="multiple-choice file .*use --task nextqa"):
        read_next_oe(mc["annotations"], mc["video_dir"], mc["video_map"])
    with open(files["extra_answers"], "w") as f:
        json.dump({"5000": {"0": "cat"}}, f)
    assert read_next_oe(files["annotations"], files["video_dir"], files["video_map"],
                        files["extra_answers"])[0].references == ["the ball", "cat"]


def test_pos_tags_from_nltks_perceptron_tagger_when_its_model_is_on_the_data_path(scorer, tmp_path, monkeypatch):
    """A tag-dictionary-only model in nltk's JSON format stands in for the downloadable one."""
    import nltk

    from megatron_emu.evaluation.wups import load_tagger

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    assert load_tagger() is None
    model = tmp_path / "nltk_data" / "taggers" / "averaged_perceptron_tagger_eng"
    model.mkdir(parents=True)
    tags = {"sat": "VBD", "on": "IN", "the": "DT", "puppies": "NNS", "playing": "NN"}
    for part, value in (("weights", {}), ("tagdict", tags), ("classes", sorted(set(tags.values())))):
        (model / f"averaged_perceptron_tagger_eng.{part}.json").write_text(json.dumps(value))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    tagged = AnswerScorer(scorer.wn, load_tagger())
    assert tagged.tagger_name == "nltk averaged perceptron"
    assert tagged.normalise("sat on the puppies") == "sit on puppy"  # VBD: the verb's base form
    assert tagged.normalise("playing") == "playing" and scorer.normalise("playing") == "play"  # NN: kept as is

"""Evaluation metrics against worked values: the official VQA accuracy of answers given by
0, 1, 2, 3 and 10 annotators and its normalisation; CIDEr / BLEU by pycocoevalcap on a
hand-checkable example; VisDial NDCG / MRR; the Frechet distance against pytorch-fid's
scipy formula, of a set with itself (~0) and with a shifted copy (exactly the shift)."""

import numpy as np
import pytest

from megatron_emu.evaluation.frechet import fid_from_features, frechet_distance, load_statistics
from megatron_emu.evaluation.ranking import ndcg, rank_of, reciprocal_rank, top1_correct
from megatron_emu.evaluation.vqa_accuracy import normalise_answer, vqa_accuracy


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_of_answers_given_by_n_annotators(matching, expected):
    """Leave-one-out over the 10 answers: n matching -> n subsets see n-1, 10-n see n, each min(./3, 1).
    n=1: 9 x 1/3 / 10 = 0.3; n=2: (2 x 1/3 + 8 x 2/3) / 10 = 0.6; n=3: (3 x 2/3 + 7) / 10 = 0.9."""
    references = ["red"] * matching + ["blue", "green", "yellow", "pink", "black", "white", "grey", "brown", "gold",
                                       "tan"][:10 - matching]
    assert vqa_accuracy("red", references) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, normalised", [
    ("Two", "2"), ("the dog.", "dog"), ("A cat, on a sofa!", "cat on sofa!"), ("1,000", "1000"),
    ("dont", "don’t"), ("2.5 meters", "2.5 meters"), ("yes\n", "yes"), ("ten dogs", "10 dogs"),
])
def test_answer_normalisation_follows_the_official_rules(prediction, normalised):
    assert normalise_answer(prediction) == normalised


def test_reference_normalisation_vqa_versus_vizwiz():
    """VQAv2 references only lose punctuation; VizWiz's are normalised like the prediction."""
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("2", ["two"] * 10, full_references=True) == 1.0
    assert vqa_accuracy("the red car", ["red car"] * 3 + ["blue"] * 7) == pytest.approx(0.9)


def test_okvqa_stems_both_sides():
    assert vqa_accuracy("dogs", ["dog"] * 10) == 0.0
    assert vqa_accuracy("dogs", ["dog"] * 10, stem=True) == 1.0
    assert vqa_accuracy("running", ["run"] * 3 + ["walk"] * 7, stem=True) == pytest.approx(0.9)


def test_vqa_accuracy_without_references_is_one_clear_error():
    with pytest.raises(ValueError, match="has none"):
        vqa_accuracy("red", [])


def test_cider_and_bleu_hand_checkable_without_java():
    """Two images, each candidate equal to its one reference, no n-gram shared between images:
    every n-gram has idf log(2/1), the candidate's tf-idf vector equals the reference's, the
    cosine is 1 for n = 1..4 and there is no length penalty: CIDEr-D = 10 x mean(1) = 10."""
    from megatron_emu.evaluation.caption_scores import caption_scores

    refs = {"1": ["a red circle on the table"], "2": ["two small dogs play outside"]}
    result = caption_scores({"1": "a red circle on the table", "2": "two small dogs play outside"}, refs, use_java=False)
    assert result["per_sample"]["1"]["CIDEr"] == pytest.approx(10.0)
    assert result["corpus"]["CIDEr"] == pytest.approx(10.0) and result["corpus"]["BLEU-4"] == pytest.approx(1.0)
    assert result["skipped"]["METEOR"] == "java not used" and result["tokenizer"].startswith("python")
    # a candidate sharing no n-gram with its references scores 0; the other keeps 10
    other = caption_scores({"1": "green houses", "2": "two small dogs play outside"}, refs, use_java=False)
    assert other["per_sample"]["1"]["CIDEr"] == 0.0 and other["per_sample"]["2"]["CIDEr"] == pytest.approx(10.0)


def test_python_tokeniser_drops_ptb_punctuation_and_splits_clitics():
    from megatron_emu.evaluation.caption_scores import python_tokenize

    assert python_tokenize("A man's dog doesn't run, fast-ish... OK?") == "a man 's dog does n't run fast-ish ok"


def test_official_ptb_tokenizer_runs_when_java_is_found():
    from megatron_emu.evaluation.caption_scores import java_available, tokenize

    if not java_available():
        pytest.skip("no java: the PTB tokenizer needs it")
    tokens, name = tokenize({"1": ["A man's dog doesn't run, fast-ish... OK?"]}, use_java=True)
    assert name.startswith("Stanford PTBTokenizer") and tokens["1"] == ["a man 's dog does n't run fast-ish ok"]


@pytest.mark.slow  # METEOR loads its paraphrase table: ~20 s on 2 busy cores
def test_java_scorers_run_when_java_is_found():
    from megatron_emu.evaluation.caption_scores import caption_scores, java_available

    if not java_available():
        pytest.skip("no java: METEOR and the PTB tokenizer need it")
    refs = {"1": ["A red circle on the table."], "2": ["Two small dogs play outside."]}
    result = caption_scores({"1": "a red circle on the table", "2": "two small dogs play outside"}, refs)
    assert result["tokenizer"].startswith("Stanford PTBTokenizer") and "METEOR" in result["scorers"]
    assert result["corpus"]["CIDEr"] == pytest.approx(10.0) and result["corpus"]["METEOR"] == pytest.approx(1.0)
    assert "SPICE" in result["scorers"] or "SPICE" in result["skipped"]


def test_visdial_ndcg_and_mrr_worked_values():
    scores = [0.1, 0.9, 0.5, 0.3]  # ranking: 1, 2, 3, 0
    relevance = [1.0, 0.0, 0.5, 0.0]  # k = 2 relevant options
    # top 2 of ours: options 1 (0) and 2 (0.5): DCG = 0 + 0.5/log2(3); ideal: 1 + 0.5/log2(3)
    expected = (0.5 / np.log2(3)) / (1 + 0.5 / np.log2(3))
    assert ndcg(scores, relevance) == pytest.approx(expected)
    assert ndcg([0.9, 0.1, 0.5, 0.3], relevance) == pytest.approx(1.0)
    assert rank_of(scores, 0) == 4 and reciprocal_rank(scores, 2) == 0.5 and top1_correct(scores, 1) == 1.0
    assert ndcg(scores, [0.0] * 4) == 0.0
    assert rank_of([0.5, 0.5], 1) == 2  # ties: the earlier option ranks first


def scipy_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm of the product), the reference."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_frechet_distance_agrees_with_pytorch_fid_formula_on_fixed_features():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))
    b = rng.normal(0.3, 1.2, size=(300, 32)) @ rng.normal(size=(32, 32))
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    ours = frechet_distance(*stats[0], *stats[1])
    assert ours == pytest.approx(scipy_frechet(*stats[0], *stats[1]), rel=1e-6)
    assert ours == pytest.approx(fid_from_features(a, b), rel=1e-12)


def test_frechet_distance_of_a_set_with_itself_and_a_shifted_copy():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(500, 16))
    assert abs(fid_from_features(features, features)) < 1e-8
    # a shift by c in every one of d dims moves only the means: FID = d c^2
    assert fid_from_features(features, features + 0.5) == pytest.approx(16 * 0.25, rel=1e-8)
    assert fid_from_features(features, features * 2) > 1.0


def test_frechet_bad_inputs_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="statistics of different sizes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))
    path = tmp_path / "stats.npz"
    np.savez(path, mu=np.zeros(3))
    with pytest.raises(ValueError, match="lacks 'sigma'"):
        load_statistics(str(path))
    np.savez(path, mu=np.ones(3), sigma=np.eye(3))
    mu, sigma = load_statistics(str(path))
    assert frechet_distance(mu, sigma, np.zeros(3), np.eye(3)) == pytest.approx(3.0)

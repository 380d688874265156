"""Tests of the metric half of eval.py: VQA/GQA accuracy, annotation loaders, caption metrics, retrieval."""

import json
import math
import platform
import shutil
import subprocess
from collections import Counter

import pytest
import timm
import torch
import transformers

import metrics as M

HAVE_JAVA = shutil.which("java") is not None


# ---- VQA normalisation and accuracy ----

@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"),             # period not before a digit dropped, lowercased, number word -> digit
    ("a dog", "dog"),          # article dropped
    ("dont", "don't"),         # contraction table
    ("isnt", "isn't"),
    ("yes!", "yes"),           # '!' not touching a space -> space, then whitespace split
    ("1,000", "1000"),         # a digit,digit comma means every mark is deleted (not spaced)
    ("3.5", "3.5"),            # period before a digit kept
    ("t-shirt", "t shirt"),    # '-' inside a word becomes a space
    ("black - white", "black white"),  # '-' touching a space is deleted
    ("  The\tNONE \n", "0"),   # tabs/newlines, 'none' -> 0, article dropped
    ("red, white", "red white"),
])
def test_normalize_vqa_answer(raw, expected):
    assert M.normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_by_hand():
    def answers(n_cat):
        return ["cat"] * n_cat + ["dog"] * (10 - n_cat)
    # 4 matches: leaving any one out leaves >= 3 matches -> 1 for every subset
    assert M.vqa_accuracy("cat", answers(4)) == pytest.approx(1.0)
    # 3 matches: 3 subsets lose a match (2/3), 7 keep 3 (1) -> (3 * 2/3 + 7) / 10 = 0.9
    assert M.vqa_accuracy("cat", answers(3)) == pytest.approx(0.9)
    # 2 matches: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert M.vqa_accuracy("cat", answers(2)) == pytest.approx(0.6)
    # 1 match: (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert M.vqa_accuracy("cat", answers(1)) == pytest.approx(0.3)
    assert M.vqa_accuracy("cat", answers(0)) == 0.0
    # the prediction is normalised: "Two." -> "2"
    assert M.vqa_accuracy("Two.", ["2"] * 10) == pytest.approx(1.0)
    # other counts: 3 answers, 2 match -> subsets (2 answers): left-out match -> 1/3, left-out other -> 2/3
    # -> (2 * 1/3 + 2/3) / 3 = 4/9
    assert M.vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)


def test_vqa_accuracy_official_ground_truth_rule():
    # annotators disagree -> their answers get the punctuation step: "t-shirt" -> "t shirt" matches
    assert M.vqa_accuracy("t-shirt", ["t-shirt"] * 5 + ["shirt"] * 5) == pytest.approx(1.0)
    # all identical -> the official evaluation leaves them raw, so the normalised "t shirt" does not match
    assert M.vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0


def _vqa_questions():
    return [
        {"question_id": 1, "answers": ["yes"] * 10, "answer_type": "yes/no"},
        {"question_id": 2, "answers": ["no"] * 10, "answer_type": "yes/no"},
        {"question_id": 3, "answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number"},
        {"question_id": 4, "answers": ["red"] * 10, "answer_type": "other"},
        {"question_id": 5, "answers": ["blue"] * 10, "answer_type": "other"},
    ]


def test_vqa_scores_per_type_missing_empty():
    preds = {1: "Yes", 2: "yes", 3: "two", 4: " "}  # 5 has no prediction, 4 is empty
    r = M.vqa_scores(preds, _vqa_questions())
    # yes/no: 1.0 and 0.0 -> 50; number: "two" -> "2", 2 of 10 agree -> 0.6 -> 60; other: empty -> 0
    assert r["yes/no"] == pytest.approx(50.0)
    assert r["number"] == pytest.approx(60.0)
    assert r["other"] == pytest.approx(0.0)
    assert r["overall"] == pytest.approx(100 * (1 + 0 + 0.6 + 0) / 4)
    assert (r["scored"], r["missing"], r["empty"]) == (4, 1, 1)


def test_vqa_scores_bad_ids():
    with pytest.raises(ValueError, match="none of"):
        M.vqa_scores({"1": "yes"}, _vqa_questions())  # str keys for int ids
    with pytest.raises(ValueError, match="not in the annotations"):
        M.vqa_scores({1: "yes", 99: "no"}, _vqa_questions())
    with pytest.raises(ValueError, match="no answer to score: none of 5 questions"):
        M.vqa_scores({}, _vqa_questions())  # an empty evaluation: not a ZeroDivisionError


def test_gqa_scores():
    questions = [{"question_id": "a", "answers": ["left"], "answer_type": "choose"},
                 {"question_id": "b", "answers": ["2"], "answer_type": "query"},
                 {"question_id": "c", "answers": ["man"], "answer_type": "query"}]
    r = M.gqa_scores({"a": "Left.", "b": "two", "c": "woman"}, questions)
    # a and b match after normalisation, c does not -> 2/3; choose 1/1, query 1/2
    assert r["overall"] == pytest.approx(200 / 3)
    assert r["choose"] == pytest.approx(100.0) and r["query"] == pytest.approx(50.0)


# ---- loaders ----

def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_load_vqa(tmp_path):
    q = _write(tmp_path / "q.json", {"questions": [
        {"image_id": 42, "question": "What color?", "question_id": 420},
        {"image_id": 7, "question": "How many?", "question_id": 70}]})
    a = _write(tmp_path / "a.json", {"annotations": [
        {"question_id": 70, "image_id": 7, "answer_type": "number", "multiple_choice_answer": "2",
         "answers": [{"answer": "2", "answer_id": i + 1} for i in range(10)]},
        {"question_id": 420, "image_id": 42, "answer_type": "other", "multiple_choice_answer": "red",
         "answers": [{"answer": "red", "answer_id": i + 1} for i in range(10)]}]})
    qs = M.load_vqa(q, a)
    assert [x["question_id"] for x in qs] == [420, 70]
    assert qs[0] == {"question_id": 420, "image": "COCO_val2014_000000000042.jpg", "question": "What color?",
                     "answers": ["red"] * 10, "answer_type": "other"}
    with pytest.raises(FileNotFoundError, match="nope.json"):
        M.load_vqa(q, str(tmp_path / "nope.json"))
    a2 = _write(tmp_path / "a2.json", {"annotations": [
        {"question_id": 70, "image_id": 7, "answer_type": "number", "answers": [{"answer": "2"}]}]})
    with pytest.raises(ValueError, match="question_id 420"):
        M.load_vqa(q, a2)


def test_load_gqa(tmp_path):
    p = _write(tmp_path / "testdev_balanced_questions.json", {
        "201": {"imageId": "n123", "question": "Is it left?", "answer": "yes", "types": {"structural": "verify"}},
        "202": {"imageId": "n124", "question": "Who?", "answer": "man"}})
    qs = M.load_gqa(p)
    assert qs[0] == {"question_id": "201", "image": "n123.jpg", "question": "Is it left?", "answers": ["yes"],
                     "answer_type": "verify"}
    assert qs[1]["answer_type"] is None
    with pytest.raises(FileNotFoundError, match="missing_gqa.json"):
        M.load_gqa(str(tmp_path / "missing_gqa.json"))
    bad = _write(tmp_path / "bad.json", {"9": {"imageId": "n1", "question": "?"}})
    with pytest.raises(ValueError, match="question 9 lacks key 'answer'"):
        M.load_gqa(bad)


def test_load_karpathy_and_retrieval(tmp_path):
    p = _write(tmp_path / "coco_karpathy_test.json", [
        {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": [f"c{i}" for i in range(5)]},
        {"image": "val2014/COCO_val2014_000000060623.jpg", "caption": ["d0", "d1", "d2"]}])
    caps = M.load_karpathy_captions(p)
    assert [c["image_id"] for c in caps] == [391895, 60623]
    assert caps[1]["captions"] == ["d0", "d1", "d2"]
    images, texts, txt2img, img2txts = M.load_retrieval(p)
    assert len(images) == 2 and len(texts) == 8
    assert txt2img == [0] * 5 + [1] * 3 and img2txts == [[0, 1, 2, 3, 4], [5, 6, 7]]
    with pytest.raises(FileNotFoundError, match="flickr30k_test.json"):
        M.load_retrieval(str(tmp_path / "flickr30k_test.json"))


def test_load_nocaps(tmp_path):
    p = _write(tmp_path / "nocaps_val_4500_captions.json", {
        "images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain"},
                   {"id": 1, "file_name": "00223d0fa8e9c6e0.jpg", "domain": "out-domain"}],
        "annotations": [{"image_id": 0, "caption": "a cat", "id": 0}, {"image_id": 1, "caption": "a dog", "id": 1},
                        {"image_id": 0, "caption": "a kitten", "id": 2}]})
    caps = M.load_nocaps(p)
    assert caps[0] == {"image_id": 0, "image": "0013ea2087020901.jpg", "captions": ["a cat", "a kitten"],
                       "domain": "in-domain"}
    with pytest.raises(FileNotFoundError, match="nocaps_missing.json"):
        M.load_nocaps(str(tmp_path / "nocaps_missing.json"))


# ---- captioning ----

PRED = {1: "a cat sits on the mat", 2: "two dogs"}
REFS = {1: ["the cat is on the mat", "there is a cat on a mat here"],
        2: ["two brown dogs play in a park", "some dogs are playing outside"]}


def _bleu1(preds, refs):
    """Corpus BLEU-1 the pycocoevalcap way: clipped unigram counts, 'closest' reference length (ties: shorter)."""
    correct = guess = testlen = reflen = 0
    for i in preds:
        hyp = preds[i].split()
        max_ref = Counter()
        for r in refs[i]:
            for w, c in Counter(r.split()).items():
                max_ref[w] = max(max_ref[w], c)
        correct += sum(min(c, max_ref[w]) for w, c in Counter(hyp).items())
        guess += len(hyp)
        testlen += len(hyp)
        reflen += min((abs(len(r.split()) - len(hyp)), len(r.split())) for r in refs[i])[1]
    bp = math.exp(1 - reflen / testlen) if testlen < reflen else 1.0
    return bp * correct / guess


def test_bleu1_by_hand():
    # image 1: 5 of 6 clipped matches (all but "sits"), closest ref length 6; image 2: 2 of 2, closest
    # ref length 5 (|2-5| < |2-7|) -> P1 = 7/8, BP = exp(1 - 11/8) -> 0.875 * exp(-0.375) = 0.60138
    assert _bleu1(PRED, REFS) == pytest.approx(0.875 * math.exp(-0.375))
    assert _bleu1(PRED, REFS) == pytest.approx(0.60138, abs=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_JAVA, reason="no java: the Java path cannot run here")
def test_caption_metrics_with_java(capsys):
    r = M.caption_metrics(PRED, REFS)
    assert r["tokenizer"].startswith("PTB")  # the results say which tokenizer made them
    assert r["BLEU-1"] == pytest.approx(_bleu1(PRED, REFS), abs=1e-6)
    for k in ["BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]:
        assert k in r and math.isfinite(r[k])
    assert 0 < r["METEOR"] < 1
    # SPICE either ran or was skipped with a one-line reason
    assert "SPICE" in r or "SPICE skipped" in capsys.readouterr().out
    same = M.caption_metrics({1: "A cat is on the mat."}, {1: ["a cat is on the mat", "a dog"]})
    assert same["BLEU-1"] == pytest.approx(1.0, abs=1e-6) and same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_caption_metrics_without_java(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java anywhere
    r = M.caption_metrics({**PRED, 3: ""}, {**REFS, 3: ["a red bus"], 4: ["unused"]})
    out = capsys.readouterr().out
    assert "no java on PATH, tokenising in pure Python" in out
    assert "METEOR skipped: no java" in out and "SPICE skipped: no java" in out
    assert "METEOR" not in r and "SPICE" not in r
    assert r["tokenizer"] == M.PYTHON_TOKENIZER and "differ from the official" in r["tokenizer"]
    assert math.isfinite(r["CIDEr"]) and math.isfinite(r["ROUGE-L"])
    # image 3's empty caption adds 0 words and 0 matches; its closest ref length (3) enters the BP
    # -> P1 = 7/8, BP = exp(1 - 14/8)
    assert r["BLEU-1"] == pytest.approx(0.875 * math.exp(1 - 14 / 8), abs=1e-6)
    assert (r["scored"], r["missing"], r["empty"]) == (3, 1, 1)
    same = M.caption_metrics({1: "A cat is on the mat."}, {1: ["a cat is on the mat", "a dog"]})
    assert same["BLEU-1"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.skipif(not HAVE_JAVA, reason="no java: nothing to compare the fallback with")
def test_simple_tokenize_matches_ptb():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    captions = ["A man riding a bike down the street.", "Two dogs' toys, on a sofa!",
                "It's a black-and-white photo (old) at 3.5 pm; can't see \"much\"...",
                "A $5 sign & 50% off/on sale: yes--no? I'm here, you'll see", "the cat's  hat is RED",
                "an old-fashioned clock tower, with a U.S. flag.", "what?! no way", "a [b] {c}"]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [M.simple_tokenize(c) for c in captions] == [ptb[i][0] for i in range(len(captions))]


def test_caption_metrics_bad_ids():
    with pytest.raises(ValueError, match="without references"):
        M.caption_metrics({1: "a", 9: "b"}, {1: ["a"]})
    with pytest.raises(ValueError, match="none of"):
        M.caption_metrics({"1": "a"}, {1: ["a"]})
    with pytest.raises(ValueError, match="no caption to score: none of 2 images has a prediction"):
        M.caption_metrics({}, {1: ["a"], 2: ["b"]})  # an empty evaluation: never BLEU 0 and ROUGE-L nan


def test_write_coco_results(tmp_path):
    p = tmp_path / "res.json"
    M.write_coco_results(str(p), {5: "a cat", 7: "a dog"})
    assert json.loads(p.read_text()) == [{"image_id": 5, "caption": "a cat"}, {"image_id": 7, "caption": "a dog"}]
    assert [x.name for x in tmp_path.iterdir()] == ["res.json"]  # no temp file left behind


# ---- retrieval ----

def _rank_row(n, order):
    """Scores for one row such that the columns in `order` come first, in that order (then the rest)."""
    rest = [j for j in range(n) if j not in order]
    s = torch.empty(n)
    s[order + rest] = torch.arange(n, 0, -1, dtype=torch.float)
    return s


def test_retrieval_recall_known_ranks():
    # 3 images x 15 texts; image i owns texts 5i..5i+4
    img2txts = [list(range(5 * i, 5 * i + 5)) for i in range(3)]
    txt2img = [t // 5 for t in range(15)]
    i2t = torch.stack([
        _rank_row(15, [3]),                       # image 0: a right caption first -> rank 0
        _rank_row(15, [0, 1, 2, 10, 9]),          # image 1: 4 wrong ones above text 9 -> rank 4
        _rank_row(15, list(range(10)) + [12]),    # image 2: 10 wrong ones above -> rank 10
    ])
    # text -> image: texts 0-4 rank their image 0th, texts 5-9 rank it 1st, texts 10-14 rank it 2nd
    t2i = torch.stack([_rank_row(3, [txt2img[t]] if t < 5 else [(txt2img[t] + 1) % 3, txt2img[t]]
                                 if t < 10 else [(txt2img[t] + 1) % 3, (txt2img[t] + 2) % 3])
                       for t in range(15)])
    r = M.retrieval_recall(i2t, t2i, txt2img, img2txts)
    # TR ranks 0, 4, 10 -> R@1 1/3, R@5 2/3, R@10 2/3; IR ranks 0 x5, 1 x5, 2 x5 -> R@1 1/3, R@5 = R@10 = 1
    assert r["TR@1"] == pytest.approx(100 / 3) and r["TR@5"] == pytest.approx(200 / 3)
    assert r["TR@10"] == pytest.approx(200 / 3)
    assert r["IR@1"] == pytest.approx(100 / 3) and r["IR@5"] == pytest.approx(100.0)
    assert r["IR@10"] == pytest.approx(100.0)
    assert r["TR_mean"] == pytest.approx(500 / 9) and r["IR_mean"] == pytest.approx(700 / 9)
    assert r["R_mean"] == pytest.approx(600 / 9)
    # blocks of any size give the same numbers
    for b in (1, 2, 7):
        assert M.retrieval_recall(i2t, t2i, txt2img, img2txts, block_rows=b) == r


def test_retrieval_recall_matches_argsort_reference():
    torch.manual_seed(0)
    n_img, per = 40, 5
    img2txts = [list(range(per * i, per * i + per)) for i in range(n_img)]
    txt2img = [t // per for t in range(n_img * per)]
    i2t = torch.randn(n_img, n_img * per)
    i2t[torch.tensor(txt2img), torch.arange(n_img * per)] += 2.0  # make it better than chance
    t2i = i2t.T + 0.5 * torch.randn(n_img * per, n_img)
    # reference: full argsort, rank = position of the best-placed right item (no ties in random floats)
    tr = [min((i2t[i].argsort(descending=True) == t).nonzero().item() for t in img2txts[i]) for i in range(n_img)]
    ir = [(t2i[t].argsort(descending=True) == txt2img[t]).nonzero().item() for t in range(n_img * per)]
    r = M.retrieval_recall(i2t, t2i, txt2img, img2txts, block_rows=3)
    for k in (1, 5, 10):
        assert r[f"TR@{k}"] == pytest.approx(100 * sum(x < k for x in tr) / n_img)
        assert r[f"IR@{k}"] == pytest.approx(100 * sum(x < k for x in ir) / len(ir))
    assert 0 < r["TR@1"] < 100  # the case is not degenerate


def test_retrieval_recall_ties_and_bad_input():
    img2txts, txt2img = [[0, 1], [2, 3]], [0, 0, 1, 1]
    r = M.retrieval_recall(torch.zeros(2, 4), torch.zeros(4, 2), txt2img, img2txts)
    assert r["TR@1"] == 0.0 and r["IR@1"] == 0.0  # constant scores find nothing
    with pytest.raises(ValueError, match="disagree"):
        M.retrieval_recall(torch.zeros(2, 4), torch.zeros(4, 2), [0, 1, 1, 1], img2txts)
    with pytest.raises(ValueError, match="NaN"):
        M.retrieval_recall(torch.full((2, 4), float("nan")), torch.zeros(4, 2), txt2img, img2txts)


def test_itm_rerank():
    coarse = torch.tensor([[0.1, 0.9, 0.5, 0.2],
                           [0.8, 0.1, 0.3, 0.7]])
    calls = []

    def itm_fn(q, idx):
        calls.append((q, idx.tolist()))
        return torch.tensor([10.0, -10.0]) if q == 0 else torch.tensor([0.0, 1.0])

    out = M.itm_rerank(coarse, 2, itm_fn)
    # row 0: top-2 = cols 1 (0.9), 2 (0.5) -> 10.9, -9.5; row 1: cols 0 (0.8), 3 (0.7) -> 0.8, 1.7
    assert calls == [(0, [1, 2]), (1, [0, 3])]
    inf = float("-inf")
    assert torch.allclose(out, torch.tensor([[inf, 10.9, -9.5, inf], [0.8, inf, inf, 1.7]]))
    # re-ranking changed the order of row 1: text 3 now wins
    assert out[1].argmax().item() == 3
    with pytest.raises(ValueError, match="3 logits for 2 candidates"):
        M.itm_rerank(coarse, 2, lambda q, idx: torch.zeros(3))


def test_print_table(capsys):
    M.print_table("VQAv2", {"overall": 52.5612, "scored": 3})
    assert capsys.readouterr().out.splitlines() == ["VQAv2", "  overall     52.56", "  scored          3"]


# ---- provenance ----

def git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_provenance_names_the_code_and_the_software():
    p = M.provenance("cpu")
    assert set(p) == {"commit", "python", "torch", "transformers", "timm", "torch_threads", "device"}
    assert p["python"] == platform.python_version() and p["torch"] == torch.__version__
    assert p["transformers"] == transformers.__version__ and p["timm"] == timm.__version__
    assert p["torch_threads"] == torch.get_num_threads() and p["device"] == "cpu"
    assert json.loads(json.dumps(p)) == p  # goes into JSON files and weights-only checkpoints as it is


def test_git_commit_dirty_and_unknown(tmp_path, monkeypatch):
    """The commit, "-dirty" once a tracked file changes (a new untracked file does not count), "unknown" outside a
    checkout or without git at all, never an exception."""
    assert M.git_commit(str(tmp_path)) == "unknown"
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-q", "-m", "a")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "b.py").write_text("untracked\n")
    assert M.git_commit(str(tmp_path)) == head and len(head) == 40
    (tmp_path / "a.py").write_text("x = 2\n")
    assert M.git_commit(str(tmp_path)) == head + "-dirty"
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert M.git_commit(str(tmp_path)) == "unknown"

"""
Zero-shot evaluation of BLIP-2 / P-Former (SPEC section 7).

This file has two halves:
- metrics and annotation loaders (pure functions, no model): VQAv2 / OK-VQA / GQA accuracy,
  COCO-style caption metrics (pycocoevalcap), image-text retrieval recall and ITM re-ranking;
- running the model (at the end of the file): a nanoGPT-style config, model loading from this project's
  checkpoints or Hugging Face BLIP-2 directories, batched generation / retrieval scoring sharded over
  torchrun ranks, and the run itself.

    python eval.py --task=vqav2 --ckpt=out/stage2/ckpt.pt
    python eval.py --task=gqa --hf=checkpoints/blip2-opt-2.7b --batch_size=32
    python eval.py --task=coco_caption --ckpt=out/stage2/ckpt.pt --prompt="a photo of"
    torchrun --standalone --nproc_per_node=8 eval.py --task=coco_retrieval --ckpt=out/stage1/ckpt.pt
"""

import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import fields, replace

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import train_common as tc
from configurator import apply_overrides, config_snapshot
from data import clean_caption, eval_transform
from model import Blip2Config, Blip2Stage1, Blip2Stage2, blip2_stage1_from_hf, blip2_stage2_from_hf

# -----------------------------------------------------------------------------
# VQA answer normalisation, following the official VQAv2 evaluation (vqaEval.py)

# the official contraction table; the capitalised keys ("Im", "Ive", ...) can never match because
# answers are lowercased first, and "somebody'd" -> "somebodyd" is backwards; both kept as they are
# to give the same numbers as the official evaluation
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = {"a", "an", "the"}
# the official list: no '.', ':', "'" (periods have their own rule, apostrophes feed the contraction table)
VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                   ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# the official pattern is "(?!<=\d)(\.)(?!\d)": its lookbehind is mistyped as a lookahead that always holds,
# so what it does is drop every period not followed by a digit ("3.5" kept, "5." -> "5", ".5" kept)
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def vqa_punctuation(s):
    """The official processPunctuation step: drop or space out punctuation, drop periods not before a digit."""
    # a mark touching a space, or any "digit,digit" in the answer ("1,000"), means the mark is deleted;
    # otherwise it becomes a space so "t-shirt" does not merge into one word ("t shirt")
    delete = _COMMA_BETWEEN_DIGITS.search(s) is not None
    out = s
    for p in VQA_PUNCTUATION:
        out = out.replace(p, "" if delete or p + " " in s or " " + p in s else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def vqa_digits_articles(s):
    """The official processDigitArticle step: lowercase, number words -> digits, drop articles, fix contractions."""
    words = [VQA_NUMBER_WORDS.get(w, w) for w in s.lower().split()]
    words = [VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(s):
    """A predicted answer normalised as the official VQAv2 evaluation does (newlines/tabs, punctuation, words)."""
    return vqa_digits_articles(vqa_punctuation(s.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(pred, gt_answers):
    """VQA accuracy of one answer: mean over leave-one-out subsets of the annotators of min(1, matches / 3)."""
    if not gt_answers:
        raise ValueError("vqa_accuracy: no ground-truth answers")
    pred = normalize_vqa_answer(pred)
    # as in the official evaluation: the ground truth gets only the punctuation step, and only when the
    # annotators disagree (VQAv2 answers are already normalised by the dataset); so with 10 identical
    # "t-shirt" answers a predicted "t-shirt" (-> "t shirt") scores 0, exactly as the official numbers do
    if len(set(gt_answers)) > 1:
        gt_answers = [vqa_punctuation(a) for a in gt_answers]
    matches = sum(a == pred for a in gt_answers)
    # leaving out annotator j removes one match when j's answer is a match
    return sum(min(1.0, (matches - (a == pred)) / 3) for a in gt_answers) / len(gt_answers)


def gqa_accuracy(pred, answer):
    """GQA accuracy of one answer: exact match of the normalised prediction with the answer."""
    # LAVIS (the BLIP-2 numbers) normalises only the prediction, which is the VQA rule above with one answer
    return float(normalize_vqa_answer(pred) == answer)


def _check_prediction_ids(predictions, known, what):
    """Every prediction must belong to a known id: a wrong key type (int vs str) would otherwise score zero silently."""
    unknown = [i for i in predictions if i not in known]
    if unknown and len(unknown) == len(predictions):
        raise ValueError(f"none of {len(predictions)} predictions matches one of {len(known)} ids (int vs str keys?)")
    if unknown:
        raise ValueError(f"{len(unknown)} predictions have {what}, e.g. {unknown[0]!r}")


def _accuracy_table(predictions, questions, score):
    """Accuracy in percent, overall and per answer type, of predictions {question_id: answer} on loaded questions."""
    _check_prediction_ids(predictions, {q["question_id"] for q in questions}, "question ids not in the annotations")
    sums, counts = {"overall": 0.0}, {"overall": 0}
    missing = empty = 0
    for q in questions:
        if q["question_id"] not in predictions:
            missing += 1
            continue
        pred = predictions[q["question_id"]]
        if not isinstance(pred, str):
            raise ValueError(f"prediction for question {q['question_id']!r} is {type(pred).__name__}, not str")
        if pred.strip():
            acc = score(pred, q["answers"])
        else:
            empty += 1  # nothing generated: wrong, and tallied so a broken decoder shows up
            acc = 0.0
        groups = ["overall"] if q["answer_type"] is None else ["overall", q["answer_type"]]
        for g in groups:
            sums[g] = sums.get(g, 0.0) + acc
            counts[g] = counts.get(g, 0) + 1
    out = {g: 100.0 * sums[g] / counts[g] for g in ["overall"] + sorted(k for k in counts if k != "overall")}
    out.update(scored=counts["overall"], missing=missing, empty=empty)
    return out


def vqa_scores(predictions, questions):
    """VQAv2 / OK-VQA accuracy (percent) overall and per answer type, with counts of scored, missing and empty.

    predictions: {question_id: answer string}; questions: the list from load_vqa. Questions without a
    prediction are left out of the accuracy and counted in "missing".
    """
    return _accuracy_table(predictions, questions, vqa_accuracy)


def gqa_scores(predictions, questions):
    """GQA accuracy (percent) overall and per structural type, with counts of scored, missing and empty."""
    return _accuracy_table(predictions, questions, lambda pred, answers: gqa_accuracy(pred, answers[0]))


# -----------------------------------------------------------------------------
# annotation loaders

def _read_json(path):
    """The parsed contents of a JSON annotation file, with errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_vqa(questions_path, annotations_path, image_pattern="COCO_val2014_{image_id:012d}.jpg"):
    """VQAv2 / OK-VQA questions with their answers, from the official questions + annotations files.

    Returns a list of {question_id, image, question, answers (list of str), answer_type}; image is
    image_pattern formatted with image_id. A question without an annotation is an error.
    """
    questions = _read_json(questions_path)
    annotations = _read_json(annotations_path)
    try:
        questions = questions["questions"]
    except (KeyError, TypeError):
        raise ValueError(f"{questions_path}: expected {{'questions': [...]}}") from None
    try:
        by_qid = {a["question_id"]: a for a in annotations["annotations"]}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{annotations_path}: expected {{'annotations': [{{'question_id', ...}}]}}, "
                         f"missing {e}") from None
    out = []
    for i, q in enumerate(questions):
        try:
            qid, image_id = q["question_id"], q["image_id"]
            if qid not in by_qid:
                raise ValueError(f"{annotations_path}: no annotation for question_id {qid} "
                                 f"(from {questions_path})")
            a = by_qid[qid]
            if a["image_id"] != image_id:
                raise ValueError(f"{annotations_path}: question_id {qid} has image_id {a['image_id']}, "
                                 f"{questions_path} says {image_id}")
            out.append({"question_id": qid, "image": image_pattern.format(image_id=image_id),
                        "question": q["question"], "answers": [x["answer"] for x in a["answers"]],
                        "answer_type": a["answer_type"]})
        except KeyError as e:
            raise ValueError(f"{questions_path} / {annotations_path}: question {i} lacks key {e}") from None
    if not out:
        raise ValueError(f"{questions_path}: no questions")
    return out


def load_gqa(questions_path, image_pattern="{image_id}.jpg"):
    """GQA questions (e.g. testdev_balanced_questions.json: {qid: {imageId, question, answer, types}}).

    Returns a list of {question_id, image, question, answers ([answer]), answer_type (the structural
    type, e.g. "verify", or None when the file has no types)}.
    """
    data = _read_json(questions_path)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{questions_path}: expected a non-empty {{question_id: {{...}}}} dict")
    out = []
    for qid, q in data.items():
        try:
            out.append({"question_id": qid, "image": image_pattern.format(image_id=q["imageId"]),
                        "question": q["question"], "answers": [q["answer"]],
                        "answer_type": q.get("types", {}).get("structural")})
        except KeyError as e:
            raise ValueError(f"{questions_path}: question {qid} lacks key {e}") from None
    return out


def _load_image_captions(path):
    """[(image file, [captions])] from a LAVIS Karpathy-style list [{image, caption: [str, ...]}]."""
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of {{image, caption}}")
    out = []
    for i, e in enumerate(data):
        try:
            image, captions = e["image"], e["caption"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: entry {i} lacks key {err}") from None
        if isinstance(captions, str):  # LAVIS train files have one caption per entry; test files a list
            raise ValueError(f"{path}: entry {i} ({image}) has one caption, expected the test-split list")
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"{path}: entry {i} ({image}) has an empty caption list or an empty caption")
        out.append((image, list(captions)))
    return out


def load_karpathy_captions(path):
    """COCO Karpathy test for captioning (LAVIS coco_karpathy_test.json).

    Returns a list of {image_id (int, the number in the file name, as in the COCO GT), image, captions}.
    """
    out, seen = [], set()
    for image, captions in _load_image_captions(path):
        m = re.search(r"(\d+)\.\w+$", image)
        if m is None:
            raise ValueError(f"{path}: no image id number in file name {image!r}")
        image_id = int(m.group(1))
        if image_id in seen:
            raise ValueError(f"{path}: image id {image_id} appears twice")
        seen.add(image_id)
        out.append({"image_id": image_id, "image": image, "captions": captions})
    return out


def load_nocaps(path):
    """NoCaps val (nocaps_val_4500_captions.json: {images: [{id, file_name, domain}], annotations}).

    Returns a list of {image_id, image, captions, domain (None when absent)}.
    """
    data = _read_json(path)
    try:
        captions = {}
        for a in data["annotations"]:
            captions.setdefault(a["image_id"], []).append(a["caption"])
        out = []
        for im in data["images"]:
            if im["id"] not in captions:
                raise ValueError(f"{path}: image id {im['id']} has no caption in 'annotations'")
            out.append({"image_id": im["id"], "image": im["file_name"], "captions": captions[im["id"]],
                        "domain": im.get("domain")})
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected {{images: [{{id, file_name}}], annotations: [{{image_id, caption}}]}}, "
                         f"missing {e}") from None
    if not out:
        raise ValueError(f"{path}: no images")
    return out


def load_retrieval(path):
    """COCO 5k / Flickr30k 1k retrieval test set (LAVIS coco_karpathy_test.json / flickr30k_test.json).

    Returns images (list of file names), texts (list of captions, raw), txt2img (image index of each
    text) and img2txts (text indices of each image).
    """
    images, texts, txt2img, img2txts = [], [], [], []
    for image, captions in _load_image_captions(path):
        img2txts.append(list(range(len(texts), len(texts) + len(captions))))
        txt2img += [len(images)] * len(captions)
        texts += captions
        images.append(image)
    return images, texts, txt2img, img2txts


# -----------------------------------------------------------------------------
# captioning metrics (pycocoevalcap: BLEU, METEOR, ROUGE-L, CIDEr, SPICE)

SPICE_DOWNLOAD_TIMEOUT = 20  # seconds; SPICE fetches Stanford CoreNLP on first use, offline it must fail fast
# tokens the pycocoevalcap PTB wrapper removes after tokenising (its PUNCTUATIONS; the bracket tokens in
# that list are upper case while the tokenizer runs with -lowerCase, so brackets survive as "-lrb-" etc.)
PTB_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_FALLBACK_TOKEN = re.compile(r"n't|'(?:s|m|d|re|ve|ll)\b|(?:[a-z]\.){2,}|\w+(?:[-./,]\w+)*|\.\.\.|--|``|''|[?!]+|\S")


def simple_tokenize(caption):
    """Pure-Python stand-in for the PTB tokenizer + punctuation removal (used when Java is missing).

    Lowercases, splits off clitics ("don't" -> "do n't", "cat's" -> "cat 's") and punctuation, keeps
    word-internal '-', '.', '/', ',' ("black-and-white", "3.5", "10,000") and "u.s.", drops what
    pycocoevalcap drops. Agrees with PTB on ordinary captions; differs on rarities like "@home", "<b>".
    """
    s = re.sub(r"(\w)n't\b", r"\1 n't", caption.lower())
    tokens = [_PTB_BRACKETS.get(t, t) for t in _FALLBACK_TOKEN.findall(s)]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and t != '"')


def _tokenize(captions):
    """{key: [caption, ...]} tokenised as pycocoevalcap does, by the Java PTB tokenizer when it can run."""
    # one caption per line for the tokenizer, so any whitespace run (including \r, \u2028) becomes a space
    captions = {k: [" ".join(c.split()) for c in v] for k, v in captions.items()}
    if shutil.which("java") is None:
        print("caption_metrics: no java on PATH, tokenising in pure Python instead of the PTB tokenizer")
        return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    try:
        out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    except Exception as e:
        print(f"caption_metrics: PTB tokenizer failed ({type(e).__name__}: {e}), tokenising in pure Python")
        return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}
    # the wrapper pairs output lines with captions by zip, so a lost line would shift everything silently
    if any(len(out.get(k, [])) != len(v) for k, v in captions.items()):
        raise RuntimeError("PTB tokenizer returned a different number of lines than captions")
    return out


def _meteor(gts, res):
    """METEOR from the pycocoevalcap jar."""
    from pycocoevalcap.meteor.meteor import Meteor
    m = Meteor()
    try:
        return m.compute_score(gts, res)[0]
    finally:
        # compute_score keeps its lock when the jar fails, and Meteor.__del__ would then wait on it forever
        if m.lock.locked():
            m.lock.release()


def _spice(gts, res):
    """SPICE from the pycocoevalcap jar (downloads Stanford CoreNLP on first use)."""
    from pycocoevalcap.spice.spice import Spice
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(SPICE_DOWNLOAD_TIMEOUT)  # urlretrieve has no timeout of its own
    try:
        scorer = Spice()
    finally:
        socket.setdefaulttimeout(old)
    return scorer.compute_score(gts, res)[0]


def caption_metrics(predictions, references):
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE (pycocoevalcap's 0-1 scale) of captions on their references.

    predictions: {image_id: caption}; references: {image_id: [captions]}. Images without a prediction
    are left out and counted in "missing" (note CIDEr's idf comes from the scored images). A metric that
    cannot run here (no Java, no CoreNLP for SPICE) is left out of the result with a printed reason.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_prediction_ids(predictions, references, "image ids without references")
    ids = [i for i in references if i in predictions]
    for i in ids:
        if not isinstance(predictions[i], str):
            raise ValueError(f"prediction for image {i!r} is {type(predictions[i]).__name__}, not str")
        if not references[i] or not all(isinstance(c, str) and c.strip() for c in references[i]):
            raise ValueError(f"references of image {i!r}: empty list or empty caption")
    # predictions before references, so the tokenizer's last input line is a non-empty reference
    tok = _tokenize({**{("res", i): [predictions[i]] for i in ids}, **{("gts", i): references[i] for i in ids}})
    res = {i: tok[("res", i)] for i in ids}
    gts = {i: tok[("gts", i)] for i in ids}

    out = {}
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    for n in range(4):
        out[f"BLEU-{n + 1}"] = bleu[n]
    java = shutil.which("java") is not None
    for name, fn in [("METEOR", _meteor), ("ROUGE-L", lambda g, r: Rouge().compute_score(g, r)[0]),
                     ("CIDEr", lambda g, r: Cider().compute_score(g, r)[0]), ("SPICE", _spice)]:
        if name in ("METEOR", "SPICE") and not java:
            print(f"caption_metrics: {name} skipped: no java on PATH")
            continue
        try:
            out[name] = float(fn(gts, res))
        except Exception as e:
            first_line = (str(e).strip().splitlines() or [""])[0]
            print(f"caption_metrics: {name} skipped: {type(e).__name__}: {first_line}")
    out.update(scored=len(ids), missing=len(references) - len(ids),
               empty=sum(not predictions[i].strip() for i in ids))
    return out


def write_coco_results(path, predictions):
    """Write {image_id: caption} as a COCO results file [{"image_id", "caption"}], atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump([{"image_id": i, "caption": c} for i, c in predictions.items()], f)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated results file behind


# -----------------------------------------------------------------------------
# retrieval

def itm_rerank(coarse, k, itm_fn):
    """Re-ranked score matrix: per row the top-k coarse candidates get itm logit + coarse score, the rest -inf.

    coarse: [n_queries x n_candidates]; itm_fn(query_index, candidate_indices) -> ITM logits [k] for
    those candidates (BLIP/LAVIS: class-1 logit; they fill with -100 where this uses -inf).
    """
    k = min(k, coarse.shape[1])
    out = torch.full(coarse.shape, float("-inf"), dtype=torch.float32, device=coarse.device)
    for q in range(coarse.shape[0]):
        top, idx = coarse[q].float().topk(k)
        itm = torch.as_tensor(itm_fn(q, idx)).to(out).reshape(-1)
        if itm.numel() != k:
            raise ValueError(f"itm_fn returned {itm.numel()} logits for {k} candidates (query {q})")
        out[q, idx] = itm + top
    return out


def retrieval_recall(scores_i2t, scores_t2i, txt2img, img2txts, block_rows=256):
    """TR@1/5/10 and IR@1/5/10 (percent) with their means, from image->text and text->image scores.

    scores_i2t: [n_img x n_txt]; scores_t2i: [n_txt x n_img] (without re-ranking simply scores_i2t.T;
    with ITM re-ranking the two directions are re-ranked separately and differ). An image counts as
    found at k when any of its captions is in its top k. Ties count against the correct item, so a
    model with constant scores gets 0, not 100. Rows are ranked block_rows at a time to bound memory.
    """
    n_img, n_txt = scores_i2t.shape
    if tuple(scores_t2i.shape) != (n_txt, n_img):
        raise ValueError(f"scores_t2i is {tuple(scores_t2i.shape)}, expected {(n_txt, n_img)}")
    if len(img2txts) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"{len(img2txts)} images / {len(txt2img)} texts in the index lists, "
                         f"scores are {n_img} x {n_txt}")
    if sorted(t for ts in img2txts for t in ts) != list(range(n_txt)) or any(
            txt2img[t] != i for i, ts in enumerate(img2txts) for t in ts):
        raise ValueError("img2txts and txt2img disagree (each text must belong to exactly one image)")
    if not all(img2txts):
        raise ValueError(f"image {[len(ts) for ts in img2txts].index(0)} has no texts")
    if torch.isnan(scores_i2t).any() or torch.isnan(scores_t2i).any():
        raise ValueError("retrieval scores contain NaN")

    tr_rank = torch.empty(n_img, dtype=torch.long)
    for a in range(0, n_img, block_rows):
        s = scores_i2t[a:a + block_rows].float()
        gt = torch.zeros_like(s, dtype=torch.bool)
        rows = [r for r, ts in enumerate(img2txts[a:a + block_rows]) for _ in ts]
        cols = [t for ts in img2txts[a:a + block_rows] for t in ts]
        gt[rows, cols] = True
        best = s.masked_fill(~gt, float("-inf")).amax(1, keepdim=True)
        tr_rank[a:a + len(s)] = ((s >= best) & ~gt).sum(1).cpu()  # wrong captions at or above the best right one
    ir_rank = torch.empty(n_txt, dtype=torch.long)
    target = torch.as_tensor(txt2img, dtype=torch.long, device=scores_t2i.device)
    for a in range(0, n_txt, block_rows):
        s = scores_t2i[a:a + block_rows].float()
        right = s.gather(1, target[a:a + len(s), None])
        ir_rank[a:a + len(s)] = ((s >= right).sum(1) - 1).cpu()  # wrong images at or above the right one

    out = {}
    for name, rank in [("TR", tr_rank), ("IR", ir_rank)]:
        for k in (1, 5, 10):
            out[f"{name}@{k}"] = 100.0 * (rank < k).double().mean().item()
        out[f"{name}_mean"] = sum(out[f"{name}@{k}"] for k in (1, 5, 10)) / 3
    out["R_mean"] = (out["TR_mean"] + out["IR_mean"]) / 2
    return out


# -----------------------------------------------------------------------------
# printing

def print_table(title, rows):
    """Print {name: number} as a small aligned table under a title (floats with 2 decimals)."""
    width = max((len(str(k)) for k in rows), default=0)
    print(title)
    for k, v in rows.items():
        print(f"  {str(k):<{width}}  {v:>8.2f}" if isinstance(v, float) else f"  {str(k):<{width}}  {v:>8}")


# ---- running the model ----
#
# Zero-shot evaluation of this project's checkpoints and of official BLIP-2 checkpoints in Hugging Face format,
# nanoGPT style: the config below, overridden by config files and --key=value arguments.
#
#   python eval.py --task=vqav2 --ckpt=out/stage2/ckpt.pt
#   python eval.py --task=coco_caption --hf=checkpoints/blip2-opt-2.7b
#   torchrun --standalone --nproc_per_node=8 eval.py --task=coco_retrieval --hf=checkpoints/blip2-itm-vit-g
#   python eval.py --task=caption --ckpt=out/tiny/stage2/ckpt.pt --ann_file=data/world/val.json \
#       --image_root=data/world/images --device=cpu
#
# Under torchrun every rank takes every world_size-th question / image / retrieval query; rank 0 gathers the
# results, computes the metrics, prints them and writes them to out_dir.

_NOT_CONFIG = set(globals())  # everything above is the metric half; what the block below adds is the config
# -----------------------------------------------------------------------------
# default config
task = "vqav2"  # vqav2 | okvqa | gqa | vqa (generic list) | coco_caption | nocaps | caption (generic list) |
#                 coco_retrieval | flickr_retrieval
# the model: exactly one of
ckpt = ""  # this project's checkpoint: stage 2 (VQA, captioning) or stage 1 (retrieval), e.g. out/stage2/ckpt.pt
hf = ""  # a Hugging Face BLIP-2 directory: Blip2ForConditionalGeneration or Blip2ForImageTextRetrieval
model_overrides = {}  # Blip2Config fields to change in a checkpoint's config, e.g. {'llm_model': '/models/opt-2.7b'}
hf_dtype = ""  # frozen ViT / LLM weights of an HF model; '' = float32 on CPU, float16 (bfloat16 for T5) on GPU
# data: '' = the task's default in TASK_DATA
ann_file = ""  # VQAv2 / OK-VQA questions, GQA questions, or the caption / retrieval / generic annotation file
answers_file = ""  # VQAv2 / OK-VQA: the annotations file with the answers
image_root = ""
image_pattern = ""  # VQAv2 / OK-VQA / GQA: the image file name from the image id
skip_missing_images = False  # False: a missing image file stops the run, naming it; True: skipped and counted
limit = 0  # evaluate only the first `limit` questions / images (quick checks); 0 = all
# generation (VQA and captioning); None = the task's default (SPEC section 7)
prompt = None  # VQA: a template with {} for the question; captioning: None = the model's config prompt
num_beams = 5
max_new_tokens = None  # VQA 10, captioning 30
min_new_tokens = None  # VQA 1, captioning 8
length_penalty = None  # VQA: -1 for FlanT5, 0 for decoder-only LLMs; captioning: 1.0
# retrieval
k_test = 128  # ITM re-ranks the top k_test candidates of every query
# system
batch_size = 64  # images per forward pass (and image-text pairs per ITM pass)
num_workers = 4
device = "cuda"
dtype = "bfloat16"  # autocast on CUDA; CPU runs in float32
log_every = 30.0  # seconds between progress lines
out_dir = "out/eval"
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k in config_snapshot(globals()) if k not in _NOT_CONFIG]


def default_config():
    """The config above as a dict (what `run` takes)."""
    return {k: globals()[k] for k in CONFIG_KEYS}


VQA_PROMPT = "Question: {} Short answer:"
TASK_FAMILY = {"vqav2": "vqa", "okvqa": "vqa", "gqa": "vqa", "vqa": "vqa", "coco_caption": "caption",
               "nocaps": "caption", "caption": "caption", "coco_retrieval": "retrieval",
               "flickr_retrieval": "retrieval"}
# default files, LAVIS' layout (the annotation files are LAVIS' / the benchmarks' own)
TASK_DATA = {
    "vqav2": dict(ann_file="data/vqav2/annotations/v2_OpenEnded_mscoco_val2014_questions.json",
                  answers_file="data/vqav2/annotations/v2_mscoco_val2014_annotations.json",
                  image_root="data/coco/images/val2014", image_pattern="COCO_val2014_{image_id:012d}.jpg"),
    "okvqa": dict(ann_file="data/okvqa/annotations/OpenEnded_mscoco_val2014_questions.json",
                  answers_file="data/okvqa/annotations/mscoco_val2014_annotations.json",
                  image_root="data/coco/images/val2014", image_pattern="COCO_val2014_{image_id:012d}.jpg"),
    "gqa": dict(ann_file="data/gqa/annotations/testdev_balanced_questions.json", image_root="data/gqa/images",
                image_pattern="{image_id}.jpg"),
    "vqa": dict(ann_file="", image_root=""),
    "coco_caption": dict(ann_file="data/coco/annotations/coco_karpathy_test.json", image_root="data/coco/images"),
    "nocaps": dict(ann_file="data/nocaps/annotations/nocaps_val_4500_captions.json",
                   image_root="data/nocaps/images"),
    "caption": dict(ann_file="", image_root=""),
    "coco_retrieval": dict(ann_file="data/coco/annotations/coco_karpathy_test.json", image_root="data/coco/images"),
    "flickr_retrieval": dict(ann_file="data/flickr30k/annotations/flickr30k_test.json",
                             image_root="data/flickr30k/images"),
}

# -----------------------------------------------------------------------------
# the model


def load_model(ckpt="", hf="", device="cpu", model_overrides=None, hf_dtype=""):
    """A Blip2Stage1 / Blip2Stage2 in eval mode on device, from this project's checkpoint (rebuilt from the
    config saved in it, then its trainable weights) or from a Hugging Face BLIP-2 directory."""
    if bool(ckpt) == bool(hf):
        raise ValueError("give the model as exactly one of --ckpt=out/stage2/ckpt.pt or --hf=<HF BLIP-2 directory>")
    overrides = dict(model_overrides or {})
    unknown = sorted(set(overrides) - {f.name for f in fields(Blip2Config)})
    if unknown:
        raise ValueError(f"model_overrides: {', '.join(unknown)} not fields of model.Blip2Config")
    if ckpt:
        state = tc.load_checkpoint(ckpt)
        if state.get("stage") not in (1, 2) or "model" not in state or "config" not in state:
            raise ValueError(f"{ckpt} is not a stage-1 or stage-2 checkpoint (stage={state.get('stage')!r}): eval "
                             f"runs stage 1 (retrieval) and stage 2 (VQA, captioning)")
        config = Blip2Config.pick({**state["config"], **overrides})
        if not device.startswith("cuda"):  # half-precision frozen weights are for GPUs
            for name in ("vit_dtype", "llm_dtype"):
                if getattr(config, name) != "float32":
                    print(f"{name}={getattr(config, name)} in {ckpt}: float32 on {device}")
                    config = replace(config, **{name: "float32"})
        weights = state["model"]
        if state["stage"] == 1:  # the checkpoint holds every Q-Former weight: no need to read BERT's
            model = Blip2Stage1(replace(config, qformer_init_from_bert=False))
            # a stage 1 aligned to a P-Former also trained llm_proj (for stage 2); retrieval has no use for it
            if getattr(model, "llm_proj", None) is None:
                weights = {k: v for k, v in weights.items() if not k.startswith("llm_proj.")}
        else:  # (the P-Former of a P-Former run is a training-time teacher only: generation never reads it)
            model = Blip2Stage2(config)
        tc.load_trainable_state_dict(model, weights, ckpt)
    else:
        config_path = os.path.join(hf, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"--hf={hf}: no config.json (expected a Hugging Face BLIP-2 directory)")
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
        architectures = hf_config.get("architectures") or []
        t5 = (hf_config.get("text_config") or {}).get("model_type") == "t5"
        dtype = hf_dtype or ("float32" if not device.startswith("cuda") else "bfloat16" if t5 else "float16")
        if "Blip2ForConditionalGeneration" in architectures:
            model = blip2_stage2_from_hf(hf, dtype=dtype, **overrides)
        elif "Blip2ForImageTextRetrieval" in architectures:
            model = blip2_stage1_from_hf(hf, dtype=dtype, **overrides)
        else:
            raise ValueError(f"{config_path}: architectures {architectures} has neither "
                             f"Blip2ForConditionalGeneration nor Blip2ForImageTextRetrieval")
    return model.to(device).eval()


def generation_kwargs(cfg, family, model):
    """num_beams, max/min_new_tokens and length_penalty for VQA or captioning, task defaults filled in."""
    t5 = model.llm.is_encoder_decoder
    defaults = dict(max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0 if t5 else 0.0) if family == "vqa" \
        else dict(max_new_tokens=30, min_new_tokens=8, length_penalty=1.0)
    out = dict(num_beams=cfg["num_beams"])
    for k, v in defaults.items():
        out[k] = v if cfg[k] is None else cfg[k]
    out["length_penalty"] = float(out["length_penalty"])
    return out


# -----------------------------------------------------------------------------
# images, sharding, progress


class ImageFiles(Dataset):
    """(eval-transformed image, index) for a list of image paths; an unreadable file is an error naming it."""

    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as img:
                img = img.convert("RGB")
        except Exception as e:  # PIL has many exception types for broken files
            raise RuntimeError(f"cannot read image {self.paths[i]}: {type(e).__name__}: {e}") from None
        return self.transform(img), i


def image_loader(paths, image_size, batch_size, num_workers):
    return DataLoader(ImageFiles(paths, eval_transform(image_size)), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers)


def find_missing_images(items, image_root, key):
    """[(item[key], path)] of the items whose image file does not exist under image_root."""
    return [(it[key], p) for it in items if not os.path.isfile(p := os.path.join(image_root, it["image"]))]


def drop_missing_images(items, image_root, key, skip, what, skippable=True):
    """Split items by whether their image file exists. A missing one is an error naming it, or with skip=True a
    printed skip that the caller counts. Returns (kept items, skipped items)."""
    missing = find_missing_images(items, image_root, key)
    if missing and not skip:
        hint = "; --skip_missing_images=True skips and counts them" if skippable else ""
        raise FileNotFoundError(f"image file not found for {what} {missing[0][0]!r}: {missing[0][1]} "
                                f"({len(missing)} of {len(items)} {what}s have no image file{hint})")
    if missing and tc.is_master():
        print(f"skipping {len(missing)} of {len(items)} {what}s without an image file, e.g. {missing[0][1]}")
    gone = {m[0] for m in missing}
    return [it for it in items if it[key] not in gone], [it for it in items if it[key] in gone]


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...]: torch.distributed.all_gather_object, or [obj] on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_predictions(parts):
    """{key: prediction} from the ranks' [(key, prediction)] lists; a key twice is an error."""
    out = {}
    for part in parts:
        for k, v in part:
            if k in out:
                raise RuntimeError(f"{k!r} was evaluated twice (sharding bug)")
            out[k] = v
    return out


class Progress:
    """Prints 'what: done/total (rate/s, eta)' at most every `every` seconds, and when done (rank 0 only)."""

    def __init__(self, what, total, every):
        self.what, self.total, self.every = what, total, every
        self.done, self.t0 = 0, time.time()
        self.last = self.t0
        self.master = tc.is_master()

    def update(self, n=1):
        self.done += n
        now = time.time()
        if self.master and (now - self.last >= self.every or self.done == self.total):
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            print(f"{self.what}: {self.done}/{self.total} ({rate:.1f}/s, {eta:.0f}s left)", flush=True)
            self.last = now


# -----------------------------------------------------------------------------
# VQA and captioning: generation


def clean_question(question, max_words=50):
    """LAVIS' question pre-processing (BlipQuestionProcessor): lowercase, delete .!"()*#:;~, at most max_words."""
    words = re.sub(r'[.!"()*#:;~]', "", question.lower()).rstrip(" ").split(" ")
    return " ".join(words[:max_words])


@torch.no_grad()
def generate_texts(model, image_paths, prompts, gen_kwargs, batch_size=64, num_workers=0, device="cpu",
                   dtype="float32", progress=None):
    """The text a Blip2Stage2 generates for each (image, text prompt) pair, in order."""
    if len(image_paths) != len(prompts):
        raise ValueError(f"{len(image_paths)} images but {len(prompts)} prompts")
    out = [None] * len(image_paths)
    for images, idx in image_loader(image_paths, model.config.image_size, batch_size, num_workers):
        idx = idx.tolist()
        with tc.autocast_context(device, dtype):
            texts = model.generate(images.to(device), prompt=[prompts[i] for i in idx], **gen_kwargs)
        for i, text in zip(idx, texts):
            out[i] = text
        if progress is not None:
            progress.update(len(idx))
    return out


def load_vqa_list(path):
    """A generic VQA file (LAVIS' format): a JSON list of {question_id (optional; default the position), image,
    question, answer: str or [str, ...], answer_type (optional)}. Returns load_vqa's question dicts."""
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of {{image, question, answer}}")
    out, seen = [], set()
    for i, e in enumerate(data):
        try:
            qid, answers = e.get("question_id", i), e["answer"]
            answers = [answers] if isinstance(answers, str) else list(answers)
            q = {"question_id": qid, "image": e["image"], "question": e["question"], "answers": answers,
                 "answer_type": e.get("answer_type")}
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: entry {i} lacks key {err}") from None
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{path}: entry {i} (question_id {qid!r}) has no answer or a non-string answer")
        if qid in seen:
            raise ValueError(f"{path}: question_id {qid!r} appears twice")
        seen.add(qid)
        out.append(q)
    return out


def generic_vqa_scores(predictions, questions):
    """Accuracy for a generic VQA file: VQA accuracy for questions with several answers, exact match of the
    normalised prediction and answer for questions with one (where leave-one-out VQA accuracy is always 0)."""
    def score(pred, answers):
        if len(answers) > 1:
            return vqa_accuracy(pred, answers)
        return float(normalize_vqa_answer(pred) == normalize_vqa_answer(answers[0]))
    return _accuracy_table(predictions, questions, score)


def load_vqa_task(task, ann_path, answers_path, image_pattern):
    if task in ("vqav2", "okvqa"):
        if not answers_path:
            raise ValueError(f"task={task} needs answers_file (the annotations JSON)")
        return load_vqa(ann_path, answers_path, **({"image_pattern": image_pattern} if image_pattern else {}))
    if task == "gqa":
        return load_gqa(ann_path, **({"image_pattern": image_pattern} if image_pattern else {}))
    return load_vqa_list(ann_path)


def load_caption_task(task, ann_path):
    """[{image_id, image, captions}]: COCO Karpathy test, NoCaps val, or a generic LAVIS list (image_id = image)."""
    if task == "coco_caption":
        return load_karpathy_captions(ann_path)
    if task == "nocaps":
        return load_nocaps(ann_path)
    items, seen = [], set()
    for image, captions in _load_image_captions(ann_path):
        if image in seen:
            raise ValueError(f"{ann_path}: image {image} appears twice (expected one entry per image)")
        seen.add(image)
        items.append({"image_id": image, "image": image, "captions": captions})
    return items


def eval_vqa(model, questions, skipped, cfg, rank=0, world_size=1):
    """Answers for this rank's share of the questions; on rank 0 the metrics of all (None elsewhere)."""
    template = VQA_PROMPT if cfg["prompt"] is None else cfg["prompt"]
    if "{}" not in template:
        raise ValueError(f"VQA prompt {template!r} has no {{}} for the question")
    mine = questions[rank::world_size]
    progress = Progress(f"{cfg['task']} (rank {rank} of {world_size})", len(mine), cfg["log_every"])
    answers = generate_texts(model, [os.path.join(cfg["image_root"], q["image"]) for q in mine],
                             [template.format(clean_question(q["question"])) for q in mine],
                             generation_kwargs(cfg, "vqa", model), cfg["batch_size"], cfg["num_workers"],
                             cfg["device"], cfg["dtype"], progress)
    predictions = merge_predictions(gather([(q["question_id"], a) for q, a in zip(mine, answers)]))
    if rank != 0:
        return None
    all_questions = questions + skipped  # skipped questions count as "missing"
    scores = {"vqav2": vqa_scores, "okvqa": vqa_scores, "gqa": gqa_scores, "vqa": generic_vqa_scores}[cfg["task"]]
    metrics = scores(predictions, all_questions)
    results = [{"question_id": q["question_id"], "answer": predictions[q["question_id"]]}
               for q in questions if q["question_id"] in predictions]
    _write_json(os.path.join(cfg["out_dir"], f"{cfg['task']}_answers.json"), results)
    return metrics


def eval_caption(model, items, skipped, cfg, rank=0, world_size=1):
    """Captions for this rank's share of the images; on rank 0 the metrics of all (None elsewhere)."""
    prompt = model.config.prompt if cfg["prompt"] is None else cfg["prompt"]
    mine = items[rank::world_size]
    progress = Progress(f"{cfg['task']} (rank {rank} of {world_size})", len(mine), cfg["log_every"])
    captions = generate_texts(model, [os.path.join(cfg["image_root"], it["image"]) for it in mine],
                              [prompt] * len(mine), generation_kwargs(cfg, "caption", model), cfg["batch_size"],
                              cfg["num_workers"], cfg["device"], cfg["dtype"], progress)
    predictions = merge_predictions(gather([(it["image_id"], c) for it, c in zip(mine, captions)]))
    if rank != 0:
        return None
    references = {it["image_id"]: it["captions"] for it in items + skipped}
    metrics = caption_metrics(predictions, references)
    write_coco_results(os.path.join(cfg["out_dir"], f"{cfg['task']}_captions.json"),
                       {it["image_id"]: predictions[it["image_id"]] for it in items if it["image_id"] in predictions})
    return metrics


def _write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# retrieval: ITC for all pairs, ITM re-ranking of the top k
# As in LAVIS, every rank computes all the features (a text's ITM candidates can be any image); the ITM
# re-ranking, which is most of the work, is shared out by query, and its top-k rows are gathered on rank 0.


TEXT_BATCH = 256  # texts per Q-Former pass for the ITC text features


@torch.no_grad()
def retrieval_features(model, image_paths, texts, batch_size=64, num_workers=0, device="cpu", dtype="float32",
                       every=30.0):
    """Everything retrieval needs from a Blip2Stage1, for all images and texts: image_embeds (ln_vision of the
    ViT, for ITM), image_feats (n_img x Q x d), text ids / mask (for ITM) and text_feats (n_txt x d)."""
    ids, mask, text_feats = [], [], []
    for a in range(0, len(texts), TEXT_BATCH):
        i, m = model.tokenize(texts[a:a + TEXT_BATCH], device)
        with tc.autocast_context(device, dtype):
            text_feats.append(model.text_feats(i, m).float())
        ids.append(i)
        mask.append(m)
    embeds, image_feats = [], []
    progress = Progress("image features", len(image_paths), every)
    store = torch.float32 if dtype == "float32" or not device.startswith("cuda") else tc.DTYPES[dtype]
    for images, _ in image_loader(image_paths, model.config.image_size, batch_size, num_workers):
        with tc.autocast_context(device, dtype):
            e = model.image_embeds(images.to(device))
            f = model.image_feats(model.qformer.encode_queries(e)[0])
        embeds.append(e.to(store))  # 5k x 257 x 1408 for COCO: kept in the autocast dtype on GPU
        image_feats.append(f.float())
        progress.update(len(images))
    return dict(image_embeds=torch.cat(embeds), image_feats=torch.cat(image_feats), ids=torch.cat(ids),
                mask=torch.cat(mask), text_feats=torch.cat(text_feats))


@torch.no_grad()
def coarse_scores(model, image_feats, text_feats, block=128):
    """ITC scores, n_img x n_txt: max over queries of the cosine, block images at a time (bounds the
    block x n_txt x Q intermediate)."""
    return torch.cat([model.similarity(image_feats[a:a + block], text_feats).float()
                      for a in range(0, len(image_feats), block)])


@torch.no_grad()
def itm_match_logits(model, image_embeds, ids, mask, batch_size, device="cpu", dtype="float32"):
    """ITM class-1 logits of the pairs (image_embeds[j], ids[j]), batch_size pairs per pass."""
    out = []
    for a in range(0, len(ids), batch_size):
        with tc.autocast_context(device, dtype):
            out.append(model.itm_logits(image_embeds[a:a + batch_size], ids[a:a + batch_size],
                                        mask[a:a + batch_size])[:, 1].float())
    return torch.cat(out)


@torch.no_grad()
def rerank_rows(model, feats, coarse, rows, direction, k, batch_size, device="cpu", dtype="float32", every=30.0):
    """ITM re-ranking of the queries `rows` of one direction ('i2t': rows are images, coarse is n_img x n_txt;
    't2i': rows are texts, coarse is n_txt x n_img). Returns (rows, candidate indices, scores), k per row:
    the top-k coarse candidates with score = ITM class-1 logit + coarse score."""
    rows = torch.as_tensor(list(rows), dtype=torch.long)
    k = min(k, coarse.shape[1])
    progress = Progress(f"ITM re-ranking {direction}", len(rows), every)
    embeds, ids, mask = feats["image_embeds"], feats["ids"], feats["mask"]

    def itm_fn(q, idx):
        r = rows[q].item()
        if direction == "i2t":  # one image against its k candidate texts
            pairs = (embeds[r:r + 1].expand(len(idx), *embeds.shape[1:]), ids[idx], mask[idx])
        else:  # one text against its k candidate images
            pairs = (embeds[idx], ids[r:r + 1].expand(len(idx), -1), mask[r:r + 1].expand(len(idx), -1))
        progress.update()
        return itm_match_logits(model, *pairs, batch_size, device, dtype)

    if len(rows) == 0:
        return rows, torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    scores = itm_rerank(coarse[rows.to(coarse.device)], k, itm_fn)  # len(rows) x n, -inf outside the top k
    vals, idx = scores.topk(k, dim=1)
    return rows, idx.cpu(), vals.cpu()


def scores_from_parts(parts, shape):
    """A dense score matrix (-inf where nothing was re-ranked) from the ranks' (rows, indices, scores)."""
    out = torch.full(shape, float("-inf"))
    seen = torch.zeros(shape[0], dtype=torch.bool)
    for rows, idx, vals in parts:
        if seen[rows].any():
            raise RuntimeError("a retrieval query was re-ranked twice (sharding bug)")
        seen[rows] = True
        out[rows[:, None], idx] = vals
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} retrieval queries were not re-ranked (sharding bug)")
    return out


def retrieval_scores(model, feats, k, batch_size, rank=0, world_size=1, device="cpu", dtype="float32",
                     every=30.0):
    """(scores_i2t, scores_t2i, coarse i2t) for retrieval_recall: each rank re-ranks every world_size-th query
    of both directions, the parts are gathered; the dense matrices on rank 0 (None elsewhere)."""
    coarse = coarse_scores(model, feats["image_feats"], feats["text_feats"])
    n_img, n_txt = coarse.shape
    i2t = rerank_rows(model, feats, coarse, range(rank, n_img, world_size), "i2t", k, batch_size, device, dtype,
                      every)
    t2i = rerank_rows(model, feats, coarse.t(), range(rank, n_txt, world_size), "t2i", k, batch_size, device,
                      dtype, every)
    parts = gather((i2t, t2i))
    if rank != 0:
        return None
    return (scores_from_parts([p[0] for p in parts], (n_img, n_txt)),
            scores_from_parts([p[1] for p in parts], (n_txt, n_img)), coarse.cpu())


def eval_retrieval(model, data, cfg, rank=0, world_size=1):
    """TR@1/5/10 and IR@1/5/10 after ITM re-ranking (and ITC alone) on rank 0; None elsewhere."""
    images, texts, txt2img, img2txts = data
    texts = [clean_caption(t, max_words=30) for t in texts]  # LAVIS' pre_caption, as in training
    feats = retrieval_features(model, [os.path.join(cfg["image_root"], p) for p in images], texts,
                               cfg["batch_size"], cfg["num_workers"], cfg["device"], cfg["dtype"], cfg["log_every"])
    out = retrieval_scores(model, feats, cfg["k_test"], cfg["batch_size"], rank, world_size, cfg["device"],
                           cfg["dtype"], cfg["log_every"])
    if rank != 0:
        return None
    scores_i2t, scores_t2i, coarse = out
    metrics = retrieval_recall(scores_i2t, scores_t2i, txt2img, img2txts)
    itc = retrieval_recall(coarse, coarse.t(), txt2img, img2txts)
    metrics.update({f"ITC {k}": v for k, v in itc.items()})
    metrics.update(images=len(images), texts=len(texts), k_test=min(cfg["k_test"], len(texts)))
    return metrics


def load_retrieval_limited(path, limit):
    """load_retrieval, cut to the first `limit` images and their texts (limit 0: all)."""
    images, texts, txt2img, img2txts = load_retrieval(path)
    if limit and limit < len(images):
        n_txt = img2txts[limit - 1][-1] + 1  # texts come image by image
        images, texts, txt2img, img2txts = images[:limit], texts[:n_txt], txt2img[:n_txt], img2txts[:limit]
    return images, texts, txt2img, img2txts


# -----------------------------------------------------------------------------
# the run


def run(cfg):
    """Evaluate as cfg (default_config() with changes) says. Returns the metrics on rank 0, None elsewhere."""
    task = cfg["task"]
    if task not in TASK_FAMILY:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASK_FAMILY)}")
    family = TASK_FAMILY[task]
    cfg = dict(cfg)
    for key, default in TASK_DATA[task].items():  # '' = the task's default files
        cfg[key] = cfg[key] or default
    if not cfg["ann_file"]:
        raise ValueError(f"task={task} needs ann_file (the annotation JSON)")

    d = tc.setup_distributed(cfg["device"])
    # annotations first, so that a wrong path fails before minutes of model loading
    skipped = []
    if family == "vqa":
        items = load_vqa_task(task, cfg["ann_file"], cfg["answers_file"], cfg["image_pattern"])
        items = items[:cfg["limit"]] if cfg["limit"] else items
        items, skipped = drop_missing_images(items, cfg["image_root"], "question_id", cfg["skip_missing_images"],
                                             "question")
    elif family == "caption":
        items = load_caption_task(task, cfg["ann_file"])
        items = items[:cfg["limit"]] if cfg["limit"] else items
        items, skipped = drop_missing_images(items, cfg["image_root"], "image_id", cfg["skip_missing_images"],
                                             "image")
    else:
        data = load_retrieval_limited(cfg["ann_file"], cfg["limit"])
        # a missing image would change the candidate set itself: always an error
        drop_missing_images([{"image": p} for p in data[0]], cfg["image_root"], "image", False, "image",
                            skippable=False)

    model = load_model(cfg["ckpt"], cfg["hf"], d.device, cfg["model_overrides"], cfg["hf_dtype"])
    source = cfg["ckpt"] or cfg["hf"]
    wanted = Blip2Stage1 if family == "retrieval" else Blip2Stage2
    if not isinstance(model, wanted):
        raise ValueError(f"task={task} needs a {'stage-1' if family == 'retrieval' else 'stage-2'} model, "
                         f"{source} is a {type(model).__name__}")
    if d.master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        print(f"{task}: {source} on {d.world_size} process(es), {cfg['ann_file']}")
    cfg["device"] = d.device

    t0 = time.time()
    if family == "vqa":
        metrics = eval_vqa(model, items, skipped, cfg, d.rank, d.world_size)
    elif family == "caption":
        metrics = eval_caption(model, items, skipped, cfg, d.rank, d.world_size)
    else:
        metrics = eval_retrieval(model, data, cfg, d.rank, d.world_size)
    if not d.master:
        return None
    if skipped:
        metrics["skipped_no_image"] = len(skipped)
    print_table(f"{task}: {source} ({time.time() - t0:.0f}s)", metrics)
    _write_json(os.path.join(cfg["out_dir"], f"{task}_metrics.json"),
                {"task": task, "source": source, "metrics": metrics, "config": cfg})
    return metrics


if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    try:
        run(default_config())
    finally:
        tc.cleanup_distributed()

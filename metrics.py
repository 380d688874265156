"""
Scoring for eval.py, pure functions without a model (and the zero-shot VQA prompt, and the atomic file writer that
every result and checkpoint goes through): the benchmarks' annotation readers (VQAv2 / OK-VQA, GQA, COCO
Karpathy, NoCaps, Flickr30k, LAVIS's MSRVTT / MSVD / VATEX video captions and MSRVTT-QA / MSVD-QA, and generic lists),
VQA answer normalisation and accuracy as the official VQAv2 evaluation computes them, caption metrics with
pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr, SPICE), and image-text retrieval recall with ITM re-ranking. Also
what every result file records besides its numbers: the code and software that produced it (provenance), and the
atomic JSON writer.
"""

import errno
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
from importlib import metadata

import torch

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
    if not counts["overall"]:
        raise ValueError(f"no answer to score: none of {len(questions)} questions has a prediction")
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
    """({key: [tokenised caption, ...]}, which tokenizer): pycocoevalcap's Java PTB tokenizer when it can run,
    else simple_tokenize (which agrees on ordinary captions but not always: scores then differ slightly from the
    official ones, and the results say so)."""
    # one caption per line for the tokenizer, so any whitespace run (including \r, \u2028) becomes a space
    captions = {k: [" ".join(c.split()) for c in v] for k, v in captions.items()}
    if shutil.which("java") is None:
        print("caption_metrics: no java on PATH, tokenising in pure Python instead of the PTB tokenizer")
        return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}, PYTHON_TOKENIZER
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    try:
        out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    except Exception as e:
        print(f"caption_metrics: PTB tokenizer failed ({type(e).__name__}: {e}), tokenising in pure Python")
        return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}, PYTHON_TOKENIZER
    # the wrapper pairs output lines with captions by zip, so a lost line would shift everything silently
    if any(len(out.get(k, [])) != len(v) for k, v in captions.items()):
        raise RuntimeError("PTB tokenizer returned a different number of lines than captions")
    return out, "PTB (Java, as the official evaluation)"


PYTHON_TOKENIZER = "pure Python stand-in for PTB (no Java: BLEU and CIDEr may differ from the official scores)"


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


CAPTION_SCORERS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


def caption_metrics(predictions, references, scorers=CAPTION_SCORERS):
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE (pycocoevalcap's 0-1 scale) of captions on their references.

    predictions: {image_id: caption}; references: {image_id: [captions]}. Images without a prediction
    are left out and counted in "missing" (note CIDEr's idf comes from the scored images). A metric that
    cannot run here (no Java, no CoreNLP for SPICE) is left out of the result with a printed reason; "tokenizer"
    says which tokenizer the scores come from. `scorers`: which of CAPTION_SCORERS to run (METEOR's Java start-up
    takes seconds; quick checks may leave it out).
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
    if not ids:
        raise ValueError(f"no caption to score: none of {len(references)} images has a prediction")
    tok, tokenizer = _tokenize({**{("res", i): [predictions[i]] for i in ids},
                                **{("gts", i): references[i] for i in ids}})
    res = {i: tok[("res", i)] for i in ids}
    gts = {i: tok[("gts", i)] for i in ids}

    unknown = set(scorers) - set(CAPTION_SCORERS)
    if unknown:
        raise ValueError(f"unknown caption scorers {sorted(unknown)}; the scorers are {', '.join(CAPTION_SCORERS)}")
    out = {}
    if "BLEU" in scorers:
        bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
        for n in range(4):
            out[f"BLEU-{n + 1}"] = bleu[n]
    java = shutil.which("java") is not None
    for name, fn in [("METEOR", _meteor), ("ROUGE-L", lambda g, r: Rouge().compute_score(g, r)[0]),
                     ("CIDEr", lambda g, r: Cider().compute_score(g, r)[0]), ("SPICE", _spice)]:
        if name not in scorers:
            continue
        if name in ("METEOR", "SPICE") and not java:
            print(f"caption_metrics: {name} skipped: no java on PATH")
            continue
        try:
            out[name] = float(fn(gts, res))
        except Exception as e:
            first_line = (str(e).strip().splitlines() or [""])[0]
            print(f"caption_metrics: {name} skipped: {type(e).__name__}: {first_line}")
    out.update(scored=len(ids), missing=len(references) - len(ids),
               empty=sum(not predictions[i].strip() for i in ids), tokenizer=tokenizer)
    return out


def write_coco_results(path, predictions):
    """Write {image_id: caption} as a COCO results file [{"image_id", "caption"}], atomically."""
    write_json(path, [{"image_id": i, "caption": c} for i, c in predictions.items()])


def write_json(path, obj, indent=None):
    """Write obj as JSON (UTF-8) atomically (write_atomic)."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=indent))


def write_atomic(path, write, binary=False):
    """Write the file at `path` whole or not at all: write(f) fills a temporary file in the same directory (text in
    UTF-8, or bytes with binary=True, e.g. `lambda f: torch.save(state, f)`), which goes to disk (fsync) before a
    rename makes it `path`. A kill or an error mid-write (a full disk, an object that cannot be serialised) leaves
    the previous file as it was, and no temporary one; a full disk is an OSError that says so and names the path."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # the temp file sits in the same directory so that os.replace is a rename on one filesystem, hence atomic
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        # torch reports a failed write as "enforce fail at inline_container.cc", the OSError as its context
        while e is not None and not (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
            e = e.__context__
        if e is not None:
            raise OSError(e.errno, f"no space left on device (or quota) writing {path}: the file there, if any, "
                                   f"is the previous one") from None
        raise
    dir_fd = os.open(directory, os.O_RDONLY)  # and the rename itself survives a power cut
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def git_commit(root):
    """The commit checked out at `root`, with "-dirty" when tracked files have uncommitted changes (as `git describe
    --dirty` counts them: untracked files do not); "unknown" outside a git checkout or without git."""
    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, a repository git refuses to read
        return "unknown"
    return commit + ("-dirty" if dirty else "")


# read when the code is imported: a result records the code that the process runs, not a tree edited since
CODE_COMMIT = git_commit(os.path.dirname(os.path.abspath(__file__)))


def package_version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def provenance(device):
    """What produced a result, for checkpoints, metrics and benchmark output: the code's commit (CODE_COMMIT),
    the versions of Python, torch, transformers and timm, torch's CPU thread count, and the device it ran on
    ("cpu", or "cuda:0 (<GPU name>)")."""
    device = str(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(device)})"
    # plain str: torch.__version__ is a subclass that a checkpoint's weights-only loading refuses
    return {"commit": CODE_COMMIT, "python": platform.python_version(), "torch": str(torch.__version__),
            "transformers": package_version("transformers"), "timm": package_version("timm"),
            "torch_threads": torch.get_num_threads(), "device": device}


def disk_full_error(err, path):
    """The OSError to raise for err met while writing path: for a full disk one that says so and names the path
    (the OS's own message names neither the cause in words a user searches for nor the file), else err itself."""
    if err.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on device writing {path}")
    return err


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
# printing, and the generic LAVIS-style files

def print_table(title, rows):
    """Print {name: number} as a small aligned table under a title (floats with 2 decimals)."""
    width = max((len(str(k)) for k in rows), default=0)
    print(title)
    for k, v in rows.items():
        print(f"  {str(k):<{width}}  {v:>8.2f}" if isinstance(v, float) else f"  {str(k):<{width}}  {v:>8}")


# BLIP-2's zero-shot VQA prompt (section 4) for OPT, {} = the cleaned question; the worlds' LLMs learn it from text
VQA_PROMPT = "Question: {} Short answer:"


def clean_question(question, max_words=50):
    """LAVIS' question pre-processing (BlipQuestionProcessor): lowercase, delete .!"()*#:;~, at most max_words."""
    words = re.sub(r'[.!"()*#:;~]', "", question.lower()).rstrip(" ").split(" ")
    return " ".join(words[:max_words])


def load_vqa_list(path):
    """A generic VQA file (LAVIS' format): a JSON list of {question_id (optional; default the position), image,
    question, answer: str or [str, ...], answer_type (optional)}. Returns load_vqa's question dicts."""
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of {{image, question, answer}}")
    return _vqa_entries(data, path)


def _vqa_entries(data, path):
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
    if task.endswith("_qa"):
        return load_video_qa(ann_path)
    if task in ("vqav2", "okvqa"):
        if not answers_path:
            raise ValueError(f"task={task} needs answers_file (the annotations JSON)")
        return load_vqa(ann_path, answers_path, **({"image_pattern": image_pattern} if image_pattern else {}))
    if task == "gqa":
        return load_gqa(ann_path, **({"image_pattern": image_pattern} if image_pattern else {}))
    return load_vqa_list(ann_path)


def load_caption_task(task, ann_path):
    """[{image_id, image, captions}]: COCO Karpathy test, NoCaps val, or a generic LAVIS list (image_id = image)."""
    if task.startswith(("video", "msrvtt", "msvd", "vatex")):
        return load_video_captions(ann_path)
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


def load_video_captions(path):
    """LAVIS's video caption files (MSRVTT, MSVD, VATEX): a list of {"video": "name.mp4", "caption": str or [str],
    "image_id": ...}, one entry per caption or per video. Returns [{image_id, image: the video, captions}], one per
    video in the file's order (eval.py reads "image" as the media file). image_id is the entry's, as LAVIS writes it
    in its results (an int when it is one, "7010" included), or the video's name in files without one."""
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of {{video, caption}}")
    captions, ids = {}, {}
    for i, e in enumerate(data):
        try:
            video, caption = e["video"], e["caption"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: entry {i} lacks key {err}") from None
        caption = [caption] if isinstance(caption, str) else caption
        if not caption or not all(isinstance(c, str) and c.strip() for c in caption):
            raise ValueError(f"{path}: entry {i} ({video}) has an empty caption")
        image_id = e.get("image_id", video)
        image_id = int(image_id) if re.fullmatch(r"-?\d+", str(image_id)) else image_id
        if ids.setdefault(video, image_id) != image_id:
            raise ValueError(f"{path}: entry {i} gives {video} the image_id {image_id!r}, "
                             f"an earlier one {ids[video]!r}")
        captions.setdefault(video, []).extend(caption)
    owner = {}
    for video, image_id in ids.items():
        if owner.setdefault(image_id, video) != video:
            raise ValueError(f"{path}: {owner[image_id]} and {video} share the image_id {image_id!r}")
    return [{"image_id": ids[v], "image": v, "captions": c} for v, c in captions.items()]


def load_video_qa(path):
    """MSRVTT-QA / MSVD-QA in LAVIS's format: a list of {"video", "question", "answer", "question_id"} (one answer,
    scored by exact match after the VQA normalisation). Returns load_vqa's question dicts, "image" the video."""
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of {{video, question, answer}}")
    for i, e in enumerate(data):
        if not isinstance(e, dict) or "video" not in e:
            raise ValueError(f"{path}: entry {i} lacks key 'video'")
    return _vqa_entries([dict(e, image=e["video"]) for e in data], path)


def load_retrieval_limited(path, limit):
    """load_retrieval, cut to the first `limit` images and their texts (limit 0: all)."""
    images, texts, txt2img, img2txts = load_retrieval(path)
    if limit and limit < len(images):
        n_txt = img2txts[limit - 1][-1] + 1  # texts come image by image
        images, texts, txt2img, img2txts = images[:limit], texts[:n_txt], txt2img[:n_txt], img2txts[:limit]
    return images, texts, txt2img, img2txts

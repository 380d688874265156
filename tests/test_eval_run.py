"""eval.py end to end on the tiny world of world.py: checkpoints of untrained stage-1 / stage-2 models saved as the
training scripts save them, and tiny Hugging Face BLIP-2 directories."""

import errno
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import eval as E
import metrics as M
import tiny
import train_common as tc
from data import eval_transform
from checkpoints import CHECKPOINT_DEFAULTS, MODEL_SIZES, read_checkpoint, take_model_sizes
from model import Blip2Config, Blip2Stage1, Blip2Stage2

HAVE_JAVA = shutil.which("java") is not None
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a hand-written VQAv2-format question set on the world's validation scenes (val_00032.jpg ...)
QUESTIONS = [(1, 32, "What color is the circle?", "other", "blue"),
             (2, 33, "What shape is it?", "other", "square"),
             (3, 34, "How many shapes are there?", "number", "2"),
             (4, 36, "How many shapes?", "number", "1")]


def tiny_config(path, world):
    """A config/stage*_tiny.py file as a training script's config dict, its data/world paths in `world`."""
    ns = {}
    with open(os.path.join(REPO, path)) as f:
        exec(f.read(), ns)
    return {k: v.replace("data/world", world) if isinstance(v, str) else v
            for k, v in ns.items() if not k.startswith("_")}


def write_vqav2(directory, questions=QUESTIONS):
    qs = {"questions": [{"question_id": q, "image_id": i, "question": text} for q, i, text, _, _ in questions]}
    ans = {"annotations": [{"question_id": q, "image_id": i, "answer_type": t, "answers": [{"answer": a}] * 10}
                           for q, i, _, t, a in questions]}
    paths = os.path.join(directory, "questions.json"), os.path.join(directory, "answers.json")
    for path, obj in zip(paths, (qs, ans)):
        with open(path, "w") as f:
            json.dump(obj, f)
    return paths


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
    """The tiny world, an untrained stage-1 and stage-2 checkpoint on it, and a VQAv2-format question set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only cost, above all on a shared CPU
    root = tiny_world
    ckpt_dir = str(tmp_path_factory.mktemp("ckpts"))
    ckpts = {}
    for stage, cls in ((1, Blip2Stage1), (2, Blip2Stage2)):
        config = tiny_config(f"config/stage{stage}_tiny.py", root)
        if stage == 2:  # as train_stage2.py saves it: with the sizes of the stage-1 checkpoint it starts from
            config = take_model_sizes({**dict.fromkeys(MODEL_SIZES + CHECKPOINT_DEFAULTS), **config}, ckpts[1])
        torch.manual_seed(stage)
        model = cls(Blip2Config.pick(config))
        ckpts[stage] = os.path.join(ckpt_dir, f"stage{stage}", "ckpt.pt")
        tc.save_checkpoint(ckpts[stage], {"stage": stage, "model": tc.trainable_state_dict(model), "config": config,
                                          "step": 0})
    questions, answers = write_vqav2(ckpt_dir)
    yield SimpleNamespace(root=root, images=os.path.join(root, "images"), val=os.path.join(root, "val.json"),
                          ckpt1=ckpts[1], ckpt2=ckpts[2], questions=questions, answers=answers)
    torch.set_num_threads(threads)


def config(tmp_path, **kw):
    cfg = dict(E.DEFAULTS)
    cfg.update(device="cpu", dtype="float32", num_workers=0, out_dir=str(tmp_path / "out"), log_every=0.0)
    cfg.update(kw)
    return cfg


def vqav2_config(world, tmp_path, **kw):
    return config(tmp_path, **{**dict(task="vqav2", ann_file=world.questions, answers_file=world.answers,
                                      image_root=world.images, image_pattern="val_{image_id:05d}.jpg"), **kw})


@pytest.fixture
def record_generate(monkeypatch):
    """Blip2Stage2.generate, recording each call's prompts and keyword arguments."""
    calls = []
    original = Blip2Stage2.generate

    def generate(self, image, prompt=None, **kwargs):
        calls.append(dict(n=image.shape[0], prompt=prompt, **kwargs))
        return original(self, image, prompt=prompt, **kwargs)
    monkeypatch.setattr(Blip2Stage2, "generate", generate)
    return calls


# ---------------------------------------------------------------- VQA

def test_vqav2_from_checkpoint(world, tmp_path, record_generate, capsys):
    metrics = E.run(vqav2_config(world, tmp_path, ckpt=world.ckpt2, batch_size=3))
    # the BLIP-2 protocol: LAVIS-cleaned question in the template, beam 5, 10 / 1 new tokens, OPT: penalty 0
    assert [c["n"] for c in record_generate] == [3, 1]
    prompts = [p for c in record_generate for p in c["prompt"]]
    assert prompts[0] == "Question: what color is the circle? Short answer:"
    assert len(prompts) == 4 and all(p.startswith("Question: ") for p in prompts)
    for c in record_generate:
        assert (c["num_beams"], c["max_new_tokens"], c["min_new_tokens"], c["length_penalty"]) == (5, 10, 1, 0.0)
    # one answer per question, written in the VQA results format; the metrics are those of these answers
    with open(tmp_path / "out" / "vqav2_answers.json") as f:
        results = json.load(f)
    assert [r["question_id"] for r in results] == [1, 2, 3, 4]
    assert all(isinstance(r["answer"], str) for r in results)
    questions = M.load_vqa(world.questions, world.answers, "val_{image_id:05d}.jpg")
    assert metrics == M.vqa_scores({r["question_id"]: r["answer"] for r in results}, questions)
    assert set(metrics) >= {"overall", "number", "other", "scored", "missing", "empty"}
    assert metrics["scored"] == 4 and metrics["missing"] == 0
    assert 0.0 <= metrics["overall"] <= 100.0
    with open(tmp_path / "out" / "vqav2_metrics.json") as f:
        written = json.load(f)
    assert written["metrics"] == metrics
    assert written["provenance"] == M.provenance("cpu")  # what produced these numbers
    out = capsys.readouterr().out
    assert "vqav2 (rank 0 of 1)" in out and "4/4" in out and "overall" in out  # tqdm's progress and the table


class StubModel:
    """A stand-in Blip2Stage2 whose answer is a function of the prompt and of the image it was given, so that
    an answer delivered to the wrong question (or computed from the wrong image) shows up in the accuracy."""

    def __init__(self, truth, image_size=16, t5=False):
        self.truth = truth  # {(prompt, image signature): answer}
        self.config = SimpleNamespace(image_size=image_size, prompt="", num_frames=1, feature_dim=0)
        self.llm = SimpleNamespace(is_encoder_decoder=t5)
        self.kwargs = []

    def generate(self, image, prompt=None, frame_mask=None, per_frame=False, **kwargs):
        assert frame_mask is None and per_frame is False  # images
        self.kwargs.append(kwargs)
        return [self.truth.get((p, signature(im)), "wrong") for p, im in zip(prompt, image)]


def signature(image):
    return round(float(image.double().mean()), 4), round(float(image[0, 0, 0]), 4)


def test_answers_reach_their_questions(world, tmp_path):
    # 8 questions on 4 images, some images shared, evaluated in batches of 3: every answer must land on its own id
    items = [{"question_id": f"q{i}", "image": f"val_{32 + i % 4:05d}.jpg", "question": f"Question {i}.",
              "answers": [f"answer {i}"], "answer_type": "yes/no" if i % 2 else None} for i in range(8)]
    transform = eval_transform(16)
    truth = {}
    for it in items:
        with Image.open(os.path.join(world.images, it["image"])) as img:
            sig = signature(transform(img.convert("RGB")))
        truth[(E.VQA_PROMPT.format(M.clean_question(it["question"])), sig)] = it["answers"][0]
    path = tmp_path / "generic.json"
    path.write_text(json.dumps([{"question_id": it["question_id"], "image": it["image"], "question": it["question"],
                                 "answer": it["answers"][0], **({"answer_type": it["answer_type"]}
                                                                if it["answer_type"] else {})} for it in items]))
    questions = M.load_vqa_list(str(path))
    assert [q["question_id"] for q in questions] == [it["question_id"] for it in items]
    cfg = config(tmp_path, task="vqa", image_root=world.images, batch_size=3)
    os.makedirs(cfg["out_dir"])
    model = StubModel(truth)
    metrics = E.eval_vqa(model, questions, [], cfg)
    # single-answer questions are scored by exact match (leave-one-out VQA accuracy would always give 0)
    assert metrics["overall"] == 100.0 and metrics["yes/no"] == 100.0 and metrics["scored"] == 8
    assert model.kwargs[0] == dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=0.0)
    # as rank 0 of 2 (no other rank to gather from here): its own half of the questions, the rest missing
    half = E.eval_vqa(model, questions, [], cfg, rank=0, world_size=2)
    assert half["scored"] == 4 and half["missing"] == 4 and half["overall"] == 100.0
    assert E.eval_vqa(model, questions, [], cfg, rank=1, world_size=2) is None  # only rank 0 scores
    with pytest.raises(RuntimeError, match="evaluated twice"):
        E.merge_predictions([[("q1", "a")], [("q1", "a")]])
    # FlanT5 gets length penalty -1; explicit settings win over the defaults
    t5 = StubModel(truth, t5=True)
    E.eval_vqa(t5, questions[:1], [], cfg)
    assert t5.kwargs[0]["length_penalty"] == -1.0
    E.eval_vqa(t5, questions[:1], [], {**cfg, "length_penalty": 2, "max_new_tokens": 4, "num_beams": 1})
    assert t5.kwargs[1] == dict(num_beams=1, max_new_tokens=4, min_new_tokens=1, length_penalty=2.0)
    with pytest.raises(ValueError, match="no {} for the question"):
        E.eval_vqa(model, questions, [], {**cfg, "prompt": "Answer:"})


def test_question_without_image(world, tmp_path):
    q, a = write_vqav2(tmp_path, QUESTIONS + [(5, 99, "What is it?", "other", "circle")])
    cfg = vqav2_config(world, tmp_path, ann_file=q, answers_file=a, ckpt=world.ckpt2)
    missing = os.path.join(world.images, "val_00099.jpg")
    with pytest.raises(FileNotFoundError, match=r"question 5: .*val_00099\.jpg \(1 of 5"):
        E.run(cfg)
    # skipped on request: counted as skipped and as missing, and left out of the accuracy
    metrics = E.run({**cfg, "skip_missing_images": True, "limit": 0, "num_beams": 1})
    assert metrics["skipped_missing_file"] == 1 and metrics["missing"] == 1 and metrics["scored"] == 4
    assert not os.path.exists(missing)
    # an image that exists but cannot be decoded: skipped with a warning naming it and counted (as in training), or
    # with strict_images an error naming it
    broken = tmp_path / "images"
    shutil.copytree(world.images, broken)
    (broken / "val_00033.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match=r"cannot read .*val_00033\.jpg"):
        metrics = E.run({**cfg, "image_root": str(broken), "skip_missing_images": True, "num_beams": 1})
    assert metrics["skipped_unreadable"] == 1 and metrics["skipped_missing_file"] == 1 and metrics["scored"] == 3
    with pytest.raises(RuntimeError, match=r"cannot read .*val_00033\.jpg"):
        E.run({**cfg, "image_root": str(broken), "skip_missing_images": True, "strict_images": True})
    # every image missing: nothing to evaluate is an error, not a ZeroDivisionError or a BLEU of 0
    with pytest.raises(FileNotFoundError, match=r"nothing to evaluate: the image file of every one of the 5 quest"):
        E.run({**cfg, "image_root": str(tmp_path / "nowhere"), "skip_missing_images": True})
    with pytest.raises(FileNotFoundError, match=r"nothing to evaluate: the image file of every one of the 8 images"):
        E.run(config(tmp_path, task="caption", ckpt=world.ckpt2, ann_file=world.val, skip_missing_images=True,
                     image_root=str(tmp_path / "nowhere")))


def test_a_full_disk_keeps_the_answers(world, tmp_path, monkeypatch):
    """The answers are written to the progress file as they come; a full disk when the results are written is one
    line naming the file, leaves no temporary file, and the answers stay in the progress file."""
    def full_disk(obj, f, **kwargs):
        f.write("[{")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(M.json, "dump", full_disk)
    with pytest.raises(OSError, match=r"no space left on device \(or quota\) writing .*vqav2_answers\.json: the file there"):
        E.run(vqav2_config(world, tmp_path, ckpt=world.ckpt2, num_beams=1, batch_size=3))
    assert os.listdir(tmp_path / "out") == ["vqav2_progress.rank0.jsonl"]
    with open(tmp_path / "out" / "vqav2_progress.rank0.jsonl") as f:
        kept = [json.loads(line) for line in f]
    assert [k["question_id"] for k in kept] == [1, 2, 3, 4] and all(isinstance(k["text"], str) for k in kept)


def test_missing_annotation_files_and_bad_models(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*nope.json"):
        E.run(vqav2_config(world, tmp_path, ann_file=str(tmp_path / "nope.json"), ckpt=world.ckpt2))
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*nope.json"):
        E.run(vqav2_config(world, tmp_path, answers_file=str(tmp_path / "nope.json"), ckpt=world.ckpt2))
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*nope.json"):
        E.run(config(tmp_path, task="coco_retrieval", ann_file=str(tmp_path / "nope.json"), ckpt=world.ckpt1))
    with pytest.raises(ValueError, match="needs ann_file"):
        E.run(config(tmp_path, task="caption", ckpt=world.ckpt2))
    with pytest.raises(ValueError, match="unknown task 'vqa2'"):
        E.run(config(tmp_path, task="vqa2", ckpt=world.ckpt2))
    with pytest.raises(ValueError, match="exactly one of"):
        E.run(vqav2_config(world, tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        E.run(vqav2_config(world, tmp_path, ckpt=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="needs a stage-2 model, .* is a Blip2Stage1"):
        E.run(vqav2_config(world, tmp_path, ckpt=world.ckpt1))
    stage0 = tmp_path / "stage0.pt"
    tc.save_checkpoint(str(stage0), {"stage": 0, "model": {}, "config": {}})
    with pytest.raises(ValueError, match="not a stage-1 or stage-2 checkpoint"):
        E.load_model(ckpt=str(stage0))
    assert E.load_model(ckpt=world.ckpt2, model_overrides={"prompt": "a photo of"}).llm.prompt == "a photo of"
    with pytest.raises(ValueError, match="model overrides: llm_modle not fields"):
        E.load_model(ckpt=world.ckpt2, model_overrides={"llm_modle": "x"})
    with pytest.raises(ValueError, match=f"^model override num_query_tokens = 4 contradicts {world.ckpt2}, whose model "
                                         f"has num_query_tokens = 8$"):
        E.load_model(ckpt=world.ckpt2, model_overrides={"num_query_tokens": 4})
    with pytest.raises(ValueError, match="cannot load BLIP-2 config"):
        E.load_model(hf=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["OPTForCausalLM"], "model_type": "opt"}))
    with pytest.raises(ValueError, match="neither Blip2ForConditionalGeneration nor Blip2ForImageTextRetrieval"):
        E.load_model(hf=str(tmp_path))


# ---------------------------------------------------------------- captioning

def test_captioning_from_checkpoint(world, tmp_path, record_generate):
    metrics = E.run(config(tmp_path, task="caption", ckpt=world.ckpt2, ann_file=world.val, image_root=world.images,
                           batch_size=5))
    for c in record_generate:  # the model's own prompt (none for a pretrained model); beam 5, 30 / 8 new tokens
        assert c["prompt"] == [""] * c["n"]
        assert (c["num_beams"], c["max_new_tokens"], c["min_new_tokens"], c["length_penalty"]) == (5, 30, 8, 1.0)
    assert metrics["scored"] == 8 and metrics["missing"] == 0
    wanted = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"} | ({"METEOR"} if HAVE_JAVA else set())
    assert wanted <= set(metrics)
    assert all(0.0 <= metrics[k] <= 10.0 for k in wanted)
    with open(tmp_path / "out" / "caption_captions.json") as f:
        results = json.load(f)  # COCO results format, one caption per image, in the file's order
    with open(world.val) as f:
        assert [r["image_id"] for r in results] == [e["image"] for e in json.load(f)]
    assert all(isinstance(r["caption"], str) for r in results)
    assert [c["n"] for c in record_generate] == [5, 3]


def test_gqa_and_nocaps_files(world, tmp_path, monkeypatch):
    # GQA: string question ids, image ids through image_pattern, exact match
    gqa = {"q1": {"imageId": "32", "question": "What color is the circle?", "answer": "blue",
                  "types": {"structural": "query"}},
           "q2": {"imageId": "33", "question": "Is it a square?", "answer": "yes", "types": {"structural": "verify"}}}
    (tmp_path / "gqa.json").write_text(json.dumps(gqa))
    metrics = E.run(config(tmp_path, task="gqa", ckpt=world.ckpt2, ann_file=str(tmp_path / "gqa.json"),
                           image_root=world.images, image_pattern="val_000{image_id}.jpg", num_beams=1))
    assert metrics["scored"] == 2 and {"query", "verify"} <= set(metrics)
    with open(tmp_path / "out" / "gqa_answers.json") as f:
        assert [r["question_id"] for r in json.load(f)] == ["q1", "q2"]
    # a missing retrieval image cannot be skipped: the candidate set would change
    (tmp_path / "ret.json").write_text(json.dumps([{"image": "val_00099.jpg", "caption": ["a", "b"]}]))
    with pytest.raises(FileNotFoundError, match=r"val_00099\.jpg \(1 of 1 images have no image file\)"):
        E.run(config(tmp_path, task="coco_retrieval", ckpt=world.ckpt1, ann_file=str(tmp_path / "ret.json"),
                     image_root=world.images, skip_missing_images=True))
    # NoCaps: integer image ids from the file, COCO results with those ids (pure-Python tokenizer: fast)
    monkeypatch.setattr(M.shutil, "which", lambda name: None)
    nocaps = {"images": [{"id": 7, "file_name": "val_00034.jpg", "domain": "in-domain"},
                         {"id": 9, "file_name": "val_00035.jpg", "domain": "out-domain"}],
              "annotations": [{"image_id": 7, "caption": "three red squares"},
                              {"image_id": 9, "caption": "a red triangle"}]}
    (tmp_path / "nocaps.json").write_text(json.dumps(nocaps))
    metrics = E.run(config(tmp_path, task="nocaps", ckpt=world.ckpt2, ann_file=str(tmp_path / "nocaps.json"),
                           image_root=world.images, num_beams=1, max_new_tokens=12))
    assert metrics["scored"] == 2 and "CIDEr" in metrics
    with open(tmp_path / "out" / "nocaps_captions.json") as f:
        assert [r["image_id"] for r in json.load(f)] == [7, 9]


def test_caption_loaders(tmp_path):
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps([{"image": "val2014/COCO_val2014_000000000042.jpg", "caption": ["a", "b"]}]))
    assert M.load_caption_task("coco_caption", str(coco)) == [
        {"image_id": 42, "image": "val2014/COCO_val2014_000000000042.jpg", "captions": ["a", "b"]}]
    generic = tmp_path / "generic.json"
    generic.write_text(json.dumps([{"image": "x.jpg", "caption": ["a"]}, {"image": "x.jpg", "caption": ["b"]}]))
    with pytest.raises(ValueError, match="x.jpg appears twice"):
        M.load_caption_task("caption", str(generic))
    # LAVIS's video files: the entries' image_id, an int when it is one, as LAVIS writes its results
    video = tmp_path / "video.json"
    video.write_text(json.dumps([{"video": "v1.mp4", "caption": "a", "image_id": "7010"},
                                 {"video": "v1.mp4", "caption": "b", "image_id": 7010},
                                 {"video": "v2.mp4", "caption": "c", "image_id": "v2"}]))
    assert M.load_caption_task("msrvtt_caption", str(video)) == [
        {"image_id": 7010, "image": "v1.mp4", "captions": ["a", "b"]},
        {"image_id": "v2", "image": "v2.mp4", "captions": ["c"]}]
    video.write_text(json.dumps([{"video": "v1.mp4", "caption": "a", "image_id": 1},
                                 {"video": "v1.mp4", "caption": "b", "image_id": 2}]))
    with pytest.raises(ValueError, match="entry 1 gives v1.mp4 the image_id 2, an earlier one 1"):
        M.load_caption_task("msrvtt_caption", str(video))
    video.write_text(json.dumps([{"video": "v1.mp4", "caption": "a", "image_id": 1},
                                 {"video": "v2.mp4", "caption": "b", "image_id": "1"}]))
    with pytest.raises(ValueError, match="v1.mp4 and v2.mp4 share the image_id 1"):
        M.load_caption_task("msrvtt_caption", str(video))


# ---------------------------------------------------------------- retrieval

def test_retrieval_from_checkpoint(world, tmp_path, monkeypatch):
    # the captions as a raw test file would have them: upper case, punctuation; eval must clean them
    with open(world.val) as f:
        entries = json.load(f)
    for e in entries:
        e["caption"] = [c.upper() + "!" for c in e["caption"]]
    ann = tmp_path / "test.json"
    ann.write_text(json.dumps(entries))
    pairs, texts = [], []
    itm, tokenize = Blip2Stage1.itm_logits, Blip2Stage1.tokenize

    def count_itm(self, image_embeds, ids, mask, image_mask=None):
        pairs.append(len(ids))
        return itm(self, image_embeds, ids, mask, image_mask)

    def record_tokenize(self, captions, device):
        texts.extend(captions)
        return tokenize(self, captions, device)
    monkeypatch.setattr(Blip2Stage1, "itm_logits", count_itm)
    monkeypatch.setattr(Blip2Stage1, "tokenize", record_tokenize)
    metrics = E.run(config(tmp_path, task="flickr_retrieval", ckpt=world.ckpt1, ann_file=str(ann),
                           image_root=world.images, k_test=3, batch_size=2))
    assert texts == [c.lower() for e in entries for c in (x[:-1] for x in e["caption"])]
    # ITM re-ranks the top 3 of every image (8) and of every text (24), 2 pairs per pass
    assert sum(pairs) == (8 + 24) * 3 and max(pairs) == 2
    for k in ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "ITC TR@1", "ITC IR@1"):
        assert 0.0 <= metrics[k] <= 100.0
    assert metrics["images"] == 8 and metrics["texts"] == 24 and metrics["k_test"] == 3
    with open(tmp_path / "out" / "flickr_retrieval_metrics.json") as f:
        assert json.load(f)["metrics"] == metrics
    # limit: the first 3 images and their 9 texts
    assert E.run(config(tmp_path, task="coco_retrieval", ckpt=world.ckpt1, ann_file=str(ann),
                        image_root=world.images, k_test=2, limit=3))["texts"] == 9


def test_stage1_checkpoint_of_a_pformer_run(world, tmp_path):
    # stage 1 aligned to a P-Former also trains llm_proj (for stage 2): retrieval loads the rest
    state = read_checkpoint(world.ckpt1)
    state["model"].update({"llm_proj.weight": torch.zeros(48, 64), "llm_proj.bias": torch.zeros(48)})
    tc.save_checkpoint(str(tmp_path / "ckpt.pt"), state)
    model = E.load_model(ckpt=str(tmp_path / "ckpt.pt"))
    reference = E.load_model(ckpt=world.ckpt1)
    assert isinstance(model, Blip2Stage1)
    assert torch.equal(model.itm_head.weight, reference.itm_head.weight)
    # but a weight that does not belong is still an error
    state["model"]["vision_proj.extra"] = torch.zeros(1)
    tc.save_checkpoint(str(tmp_path / "ckpt.pt"), state)
    with pytest.raises(ValueError, match="unexpected .*vision_proj.extra"):
        E.load_model(ckpt=str(tmp_path / "ckpt.pt"))


class FakeRetrievalModel:
    """ITC scores from the given matrix; an ITM that knows which image goes with which text."""

    def __init__(self, coarse, txt2img):
        self.coarse, self.txt2img, self.calls = coarse, txt2img, []

    def similarity(self, image_feats, text_feats):  # image_feats / text_feats hold the row / column indices
        return self.coarse[image_feats[:, 0, 0].long()][:, text_feats[:, 0].long()]

    def itm_logits(self, image_embeds, ids, mask):
        self.calls.append(len(ids))
        match = torch.tensor([self.txt2img[t] == i for i, t in zip(image_embeds[:, 0, 0].long().tolist(),
                                                                    ids[:, 0].tolist())])
        return torch.stack([torch.zeros(len(ids)), 1000.0 * match.float()], 1)


def test_itm_reranking_decides_within_the_top_k():
    torch.manual_seed(0)
    n_img, per = 6, 2
    txt2img = [i for i in range(n_img) for _ in range(per)]
    img2txts = [list(range(i * per, i * per + per)) for i in range(n_img)]
    coarse = torch.randn(n_img, n_img * per)
    model = FakeRetrievalModel(coarse, txt2img)
    image_index = torch.arange(n_img).float()[:, None, None]  # the fake features carry their own index
    feats = dict(image_feats=image_index, image_embeds=image_index,
                 text_feats=torch.arange(n_img * per).float()[:, None], ids=torch.arange(n_img * per)[:, None],
                 mask=torch.ones(n_img * per, 1, dtype=torch.long))
    # k covering every candidate: the all-knowing ITM puts the right answers first
    cfg = dict(E.DEFAULTS, k_test=100, batch_size=4, device="cpu", dtype="float32", log_every=0.0)
    i2t, t2i, c = E.retrieval_scores(model, feats, cfg)
    assert torch.equal(c, coarse)
    r = M.retrieval_recall(i2t, t2i, txt2img, img2txts)
    assert r["TR@1"] == 100.0 and r["IR@1"] == 100.0
    # k = 1: ITM sees only the coarse favourite, so rank 1 is the coarse one, and only top-1 scores are finite
    i2t, t2i, _ = E.retrieval_scores(model, feats, {**cfg, "k_test": 1})
    assert torch.equal(i2t.argmax(1), coarse.argmax(1)) and torch.isfinite(i2t).sum() == n_img
    assert M.retrieval_recall(i2t, t2i, txt2img, img2txts)["TR@1"] == \
        M.retrieval_recall(coarse, coarse.t(), txt2img, img2txts)["TR@1"]
    # sharded over 3 ranks, the parts put together give the single-process matrices
    model.calls.clear()
    cfg3 = {**cfg, "k_test": 3}
    whole = E.retrieval_scores(model, feats, cfg3)
    assert sum(model.calls) == (n_img + n_img * per) * 3
    coarse_t = E.coarse_scores(model, feats["image_feats"], feats["text_feats"])
    parts = [(E.rerank_rows(model, feats, coarse_t, range(r, n_img, 3), "i2t", cfg3),
              E.rerank_rows(model, feats, coarse_t.t(), range(r, n_img * per, 3), "t2i", cfg3)) for r in range(3)]
    assert torch.equal(E.scores_from_parts([p[0] for p in parts], (n_img, n_img * per)), whole[0])
    assert torch.equal(E.scores_from_parts([p[1] for p in parts], (n_img * per, n_img)), whole[1])
    with pytest.raises(RuntimeError, match="not re-ranked"):
        E.scores_from_parts([p[0] for p in parts[:2]], (n_img, n_img * per))


# ---------------------------------------------------------------- Hugging Face directories

def test_hugging_face_directories(world, tmp_path, record_generate):
    from transformers import AutoTokenizer

    gen, tok = tiny.hf_blip2("opt")
    gen.save_pretrained(tmp_path / "blip2-opt")
    tok.save_pretrained(tmp_path / "blip2-opt")
    bert = AutoTokenizer.from_pretrained(os.path.join(world.root, "bert"))
    itm = tiny.hf_blip2_retrieval(bert)
    itm.save_pretrained(tmp_path / "blip2-itm")
    bert.save_pretrained(tmp_path / "blip2-itm")

    assert isinstance(E.load_model(hf=str(tmp_path / "blip2-opt")), Blip2Stage2)
    metrics = E.run(vqav2_config(world, tmp_path, hf=str(tmp_path / "blip2-opt"), num_beams=2))
    assert metrics["scored"] == 4 and 0.0 <= metrics["overall"] <= 100.0
    assert record_generate and all(c["num_beams"] == 2 for c in record_generate)
    metrics = E.run(config(tmp_path, task="coco_retrieval", hf=str(tmp_path / "blip2-itm"), ann_file=world.val,
                           image_root=world.images, k_test=4))
    assert metrics["texts"] == 24 and 0.0 <= metrics["R_mean"] <= 100.0
    with pytest.raises(ValueError, match="needs a stage-1 model"):
        E.run(config(tmp_path, task="coco_retrieval", hf=str(tmp_path / "blip2-opt"), ann_file=world.val,
                     image_root=world.images))


# ---------------------------------------------------------------- command line, torchrun

@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(world, tmp_path):
    args = ["--task=vqav2", f"--ckpt={world.ckpt2}", f"--ann_file={world.questions}",
            f"--answers_file={world.answers}", f"--image_root={world.images}", "--image_pattern=val_{image_id:05d}.jpg",
            "--device=cpu", "--num_workers=0", "--batch_size=1", "--num_beams=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = E.run(vqav2_config(world, tmp_path, ckpt=world.ckpt2, batch_size=1, num_beams=2,
                             out_dir=str(tmp_path / "one")))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = subprocess.run(torchrun + ["eval.py"] + args + [f"--out_dir={tmp_path / 'two'}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 process(es)" in p.stdout and "vqav2 (rank 0 of 2)" in p.stdout and "2/2" in p.stdout
    with open(tmp_path / "one" / "vqav2_answers.json") as f1, open(tmp_path / "two" / "vqav2_answers.json") as f2:
        assert json.load(f1) == json.load(f2)
    with open(tmp_path / "two" / "vqav2_metrics.json") as f:
        assert json.load(f)["metrics"] == one
    assert sorted(os.listdir(tmp_path / "two")) == ["vqav2_answers.json", "vqav2_metrics.json"]  # progress files gone

"""
A study of the method on video: the video world, clips of a shape moving left or right whose caption needs more than
one frame, and BLIP-2 trained on it with the repository's video path (data.py decodes the clips, the Q-Former reads
the frames' tokens together), with and without P-Former, compared with a single-frame model.

    python -m studies.video_world                 # the full size: out/video_world/results.md
    python -m studies.video_world --size=small    # the tests' size (tests/test_video_world.py)
    python -m studies.video_world --size=small --ship=assets/video_world_backbones   # pretrain the shipped ones again
    options: --size=full|small --data=DIR (the world) --out=DIR --ship=DIR

Run from the repository root (the train scripts and eval.py run as steps, runs.py: reused when done, resumed when
interrupted). The world is built once under --data (clips as H.264 mp4 files, LAVIS video captions, MSRVTT-QA's
format for the questions, a text corpus, and backbones pretrained on it as world.py pretrains the quick start's);
its stages use studies/config/video_world_*.py.
"""
import io
import json
import os
import random
import sys
import tarfile
import time

from tqdm import tqdm

import runs
from configurator import apply_overrides, override_args
from world import (COLORS, COUNTS, SHAPES, SIZES, TINY_VIT, WORDS, blind_baselines, built_already,
                   copy_shipped_backbones, llm_pages, qa_sentence, record_build, render_scene, save_shipped_backbones,
                   shipped_backbones, write_backbones, write_bert, write_video)

# -----------------------------------------------------------------------------
# the video world: clips whose caption needs more than one frame


DIRECTIONS = {"left": (-1, 0), "right": (1, 0)}
VIDEO_WORDS = WORDS + "moves moving left right up down which way does that there".split()


def random_clip(rng):
    """One object that moves (colour, shape, size, direction) from a start drawn alike for every direction, so that
    the first frame (the one a single-frame model sees) tells nothing of the direction, and half the time a still
    object of another colour in a corner."""
    color, still = rng.sample(list(COLORS), 2)
    mover = dict(color=color, shape=rng.choice(SHAPES), size=rng.choice(SIZES), direction=rng.choice(list(DIRECTIONS)),
                 x0=rng.uniform(0.3, 0.7), y0=rng.uniform(0.3, 0.7))
    others = [dict(color=still, shape=rng.choice(SHAPES), size="small", x=rng.choice([0.15, 0.85]),
                   y=rng.choice([0.15, 0.85]))] if rng.random() < 0.5 else []
    return dict(mover=mover, still=others)


def clip_captions(clip):
    m = clip["mover"]
    return [f"a {m['size']} {m['color']} {m['shape']} moves {m['direction']}",
            f"there is a {m['size']} {m['color']} {m['shape']} moving {m['direction']}"]


def clip_questions(clip):
    """(question, answer, type): the direction needs two frames or more; colour, shape and count need one."""
    m = clip["mover"]
    return [(f"which way does the {m['color']} {m['shape']} move?", m["direction"], "direction"),
            ("what color is the shape that moves?", m["color"], "color"),
            (f"what shape moves {m['direction']}?", m["shape"], "shape"),
            ("how many shapes are there?", COUNTS[len(clip["still"])], "count")]


def render_clip(clip, n_frames, size, positions=False):
    """The clip's frames: the mover goes 0.4 of the frame along its direction, the still object stays. With
    `positions`, each frame comes as {"image", "mover": the mover where it is drawn}."""
    m, (dx, dy) = clip["mover"], DIRECTIONS[clip["mover"]["direction"]]
    frames = []
    for t in range(n_frames):
        f = 0.4 * t / (n_frames - 1)  # 0 .. 0.4 along the path
        mover = dict(m, x=m["x0"] + f * dx, y=m["y0"] + f * dy)
        image = render_scene(clip["still"] + [mover], size)
        frames.append({"image": image, "mover": mover} if positions else image)
    return frames


def frame_example(rng, size):
    """A single frame of a random clip and what the ViT learns to name in it: the mover's colour, shape and size, and
    which third of the frame it is in, across and down. One frame only: the ViT never sees motion."""
    clip = random_clip(rng)
    frame = rng.choice(render_clip(clip, 8, size, positions=True))
    m = frame["mover"]
    third = lambda v: min(2, int(v * 3))  # noqa: E731
    return frame["image"], [list(COLORS).index(m["color"]), SHAPES.index(m["shape"]), SIZES.index(m["size"]),
                            third(m["x"]), third(m["y"])], [len(COLORS), len(SHAPES), len(SIZES), 3, 3]


def write_clips(out, n_train, n_test, n_text, n_frames=8, size=32, seed=0):
    """Clips under out/videos with train.json (LAVIS video captions), test_captions.json, test_qa.json (MSRVTT-QA's
    format: {video, question, answer, question_id}), the training pairs as a tar shard (key.mp4 + key.txt), and a
    text corpus of n_text more clips (corpus_captions.txt, corpus_qa.txt). Returns the text-only clips."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    splits, qa = {"train": [], "test": []}, []
    for i in tqdm(range(n_train + n_test), desc="clips", mininterval=5, file=sys.stdout):
        split, clip = "train" if i < n_train else "test", random_clip(rng)
        name = f"{split}_{i:05d}.mp4"
        write_video(os.path.join(out, "videos", name), render_clip(clip, n_frames, size))
        splits[split].append({"video": name, "caption": clip_captions(clip), "clip": clip})
        if split == "test":
            qa += [{"video": name, "question": q, "answer": a, "answer_type": t, "question_id": len(qa) + k}
                   for k, (q, a, t) in enumerate(clip_questions(clip))]
    for name, obj in (("train.json", splits["train"]), ("test_captions.json", splits["test"]), ("test_qa.json", qa)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    with tarfile.open(os.path.join(out, "shards", "train-000.tar"), "w") as tar:
        for a in splits["train"]:
            key = os.path.splitext(a["video"])[0]
            tar.add(os.path.join(out, "videos", a["video"]), arcname=a["video"])
            info, data = tarfile.TarInfo(key + ".txt"), a["caption"][0].encode()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    text = [random_clip(rng) for _ in range(n_text)]
    with open(os.path.join(out, "corpus_captions.txt"), "w") as f:
        f.writelines(c + "\n" for clip in text for c in clip_captions(clip))
    with open(os.path.join(out, "corpus_qa.txt"), "w") as f:
        f.writelines(qa_sentence(q, a) + "\n" for clip in text for q, a, _ in clip_questions(clip))
    return text


VIDEO_WORLD = dict(n_train=3000, n_test=100, n_text=3000, n_frames=8, image_size=48, llm_width=64, llm_layers=2,
                   llm_steps=1500, vit_steps=300, seed=0)
# the LLM and the ViT of the tests' world (the small size's) ship in assets/video_world_backbones: pretraining them
# would take most of the test's time. The text clips follow the pairs' and test clips in one random stream, so every
# setting counts. `--size=small --ship=DIR` pretrains them again.
VIDEO_BACKBONE_SETTINGS = tuple(VIDEO_WORLD)
VIDEO_BERT = dict(bert_width=64, bert_layers=2)  # random, so made on the spot, shipped backbones or not
VIDEO_SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                             "video_world_backbones")


def build_video_world(out="data/video", pretrain=False, shipped=VIDEO_SHIPPED, **overrides):
    """The video world under `out`, built once: clips, a BERT and an OPT that read its text (pages: a clip's
    caption, then questions about it), and a ViT (TINY_VIT's shape) pretrained on single frames to name the moving
    object and where it is: what a frozen image encoder knows, and nothing about motion. The LLM and the ViT are the
    shipped ones when they were pretrained with these settings (unless `pretrain`), else pretrained here."""
    cfg = {**VIDEO_WORLD, **overrides}
    if built_already(out, cfg, "video world"):
        return cfg
    t0 = time.time()
    text = write_clips(out, cfg["n_train"], cfg["n_test"], cfg["n_text"], cfg["n_frames"], cfg["image_size"],
                       cfg["seed"])
    shipped = None if pretrain else shipped_backbones(cfg, shipped, VIDEO_BACKBONE_SETTINGS)
    if shipped:
        write_bert(out, cfg["seed"], **VIDEO_BERT, words=VIDEO_WORDS)
        facts = copy_shipped_backbones(shipped, out)
    else:
        pages = llm_pages(text, random.Random(cfg["seed"]), captions_of=clip_captions, questions_of=clip_questions)
        with open(os.path.join(out, "corpus_captions.txt")) as f, open(os.path.join(out, "corpus_qa.txt")) as g:
            corpus = f.read().splitlines() + g.read().splitlines()
        llm_loss, vit_loss = write_backbones(
            out, corpus, pages, **VIDEO_BERT, llm_width=cfg["llm_width"],
            llm_layers=cfg["llm_layers"], llm_steps=cfg["llm_steps"], vit_kwargs=TINY_VIT,
            image_size=cfg["image_size"], vit_steps=cfg["vit_steps"], seed=cfg["seed"], words=VIDEO_WORDS,
            example=frame_example)
        facts = dict(llm_loss=llm_loss, vit_loss=vit_loss, pretrain_seconds=time.time() - t0)
    seconds = time.time() - t0
    print(f"video world: {cfg['n_train']} training and {cfg['n_test']} test clips, LLM {facts['llm_loss']:.3f}, "
          f"ViT {facts['vit_loss']:.3f}, {seconds:.0f}s")
    record_build(out, cfg, seconds=seconds, **facts)
    return cfg


# -----------------------------------------------------------------------------
# the study: BLIP-2 on clips and on single frames, with and without P-Former

STUDY_SIZES = {
    "full": dict(world={}, pformer=300, stage1=150, stage2=600, log_interval=50, captions=True),
    # the tests' size: half the clips (a few hundred were too few to learn the direction), fewer LLM steps (the
    # shipped backbones), stage 2 alone from scratch, three runs, video QA alone
    "small": dict(world=dict(n_train=1500, n_test=60, llm_steps=800), pformer=60, stage1=0, stage2=400,
                  log_interval=10, captions=False),
}


def world_args(script, data):
    """--key=value arguments that point a stage's studies/config/video_world_*.py at the video world in `data`:
    each data and backbone path of the config, listed once."""
    clips = dict(train_ann=[f"{data}/train.json"], train_image_roots=[f"{data}/videos"],
                 vit_pretrained=f"{data}/vit.pth")
    paths = {"train_pformer.py": dict(train_text=[f"{data}/corpus_captions.txt"],
                                      val_text=[f"{data}/test_captions.json"], bert=f"{data}/bert",
                                      llm_model=f"{data}/llm"),
             "train_stage1.py": dict(clips, bert=f"{data}/bert"),
             "train_stage2.py": dict(clips, llm_model=f"{data}/llm")}
    return override_args(paths[script])


def train(name, script, out_dir, steps, data, timings, *extra):
    """One stage on the video world: `script` with its studies/config/video_world_*.py, pointed at `data`, `extra`
    last (runs.train: reused when done, resumed when interrupted)."""
    config = f"studies/config/video_world_{script.removeprefix('train_').removesuffix('.py')}.py"
    return runs.train(name, script, config, out_dir, steps, data, timings, *world_args(script, data), *extra)


def main(size="full", data="data/video", out="out/video_world"):
    """The video world built in `data`; P-Former stage 0 on its text, then stages 1 and 2 on 4-frame clips and on
    single frames, with and without P-Former (the small size: stage 2 alone, three runs, QA alone), zero-shot video
    QA and captions; a table in {out}/results.md. Returns the results of each run and the blind baselines."""
    S, timings, t_start = STUDY_SIZES[size], {}, time.time()
    build_video_world(data, **S["world"])
    timings["video world"] = time.time() - t_start
    log, pformer = f"--log_interval={S['log_interval']}", f"--pformer_ckpt={out}/pformer/ckpt.pt"
    train("P-Former stage 0", "train_pformer.py", f"{out}/pformer", S["pformer"], data, timings, log)
    arms = [("BLIP-2, 4 frames", "4", []), ("BLIP-2, 1 frame", "1", []),
            ("BLIP-2 + P-Former, 4 frames", "4", [pformer])]
    arms += [("BLIP-2 + P-Former, 1 frame", "1", [pformer])] if size == "full" else []
    results = {}
    for name, frames, extra in arms:
        d = f"{out}/{name.replace(' ', '').replace(',', '_').replace('+', '_').lower()}"
        stage1 = f"--stage1_ckpt={d}/stage1/ckpt.pt" if S["stage1"] else "--stage1_ckpt="
        if S["stage1"]:
            train(f"{name}: stage 1", "train_stage1.py", f"{d}/stage1", S["stage1"], data, timings, log,
                  f"--num_frames={frames}", *extra)
        train(f"{name}: stage 2", "train_stage2.py", f"{d}/stage2", S["stage2"], data, timings, log,
              f"--num_frames={frames}", stage1, *extra)
        ckpt = f"{d}/stage2/ckpt.pt"
        results[name] = dict(dir=d, vqa=runs.evaluate(f"{name}: eval QA", ckpt, "video_qa", "test_qa.json",
                                                      f"{d}/eval", data, timings, "['CIDEr']", media="videos"))
        if S["captions"]:
            results[name]["caption"] = runs.evaluate(f"{name}: eval captions", ckpt, "video_caption",
                                                     "test_captions.json", f"{d}/eval", data, timings, "['CIDEr']",
                                                     media="videos")
    import metrics as M

    questions = M.load_video_qa(f"{data}/test_qa.json")
    blind = blind_baselines(data, questions, M.load_video_captions(f"{data}/test_captions.json"))
    types = sorted(k for k in next(iter(results.values()))["vqa"] if k not in ("overall", "scored", "missing", "empty"))
    lines = ["| model | " + " | ".join(f"QA: {t}" for t in types) + " | QA overall (%) | caption CIDEr |",
             "|---" * (len(types) + 3) + "|"]
    lines += ["| blind: most frequent answer to each question in the text | " + " | ".join(
        f"{blind['answer per question'][t]:.1f}" for t in types) + f" | {blind['answer per question']['overall']:.1f}"
        f" | {blind['top caption CIDEr']:.3f} |"]
    lines += [f"| {n} | " + " | ".join(f"{r['vqa'][t]:.1f}" for t in types) + f" | {r['vqa']['overall']:.1f} | "
              f"{r.get('caption', {}).get('CIDEr', float('nan')):.3f} |" for n, r in results.items()]
    lines += ["", f"{time.time() - t_start:.0f} s in all"]
    table = "\n".join(lines)
    print("\n" + table)
    runs.write_results(f"{out}/results", table, {"results": results, "blind": blind, "seconds": timings})
    return results, blind


if __name__ == "__main__":
    options = dict(size="full", data="data/video", out="out/video_world", ship="")
    try:
        apply_overrides(options, sys.argv[1:])
        if options["size"] not in STUDY_SIZES:
            raise ValueError(f"--size={options['size']}: expected one of {', '.join(STUDY_SIZES)}")
    except ValueError as e:
        raise SystemExit(f"studies/video_world.py: {e} (options: --size=full|small, --data=DIR, --out=DIR, "
                         "--ship=DIR)")
    ship = options.pop("ship")
    if ship:  # the world of this size with its LLM and ViT pretrained here, which then become the shipped ones
        save_shipped_backbones(options["data"], build_video_world(options["data"], pretrain=True,
                                                                  **STUDY_SIZES[options["size"]]["world"]), ship)
    else:
        main(**options)

"""
The quick start: the whole method end to end on a laptop CPU, offline. Each step is one of the repository's
scripts, run as you would run it by hand with a config file:

    world.py --quickstart     scenes, captions, questions, a text corpus; a ViT and an OPT pretrained on them
    train_pformer.py          P-Former stage 0 on the text corpus
    train_stage1.py           BLIP-2 stage 1, twice: plain, and aligned to the P-Former
    train_stage2.py           BLIP-2 stage 2, twice, likewise
    eval.py                   zero-shot VQA and captioning on the held-out scenes, for both runs

then a table of the results next to blind baselines (out/quickstart/results.md), a picture of held-out scenes with
what each model said (samples.png) and the loss curves of every stage (losses.png).

    python quickstart.py                  # the full size (make quickstart)
    python quickstart.py --size=small     # a minute or two (tests/test_quickstart.py)

Everything already done is reused: the world, and every stage whose checkpoint reached its last step; a stage
that was interrupted continues from its checkpoint (init_from=resume).
"""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

from metrics import write_json

SIZES = {  # world.py settings, the steps of each stage, and the caption scorers
    "full": dict(world={}, pformer=300, stage1=300, stage2=600, log_interval=20,
                 scorers="['BLEU','METEOR','ROUGE-L','CIDEr']"),
    "small": dict(world=dict(n_train=200, n_test=24, n_text=1500, vit_steps=100, llm_width=64, llm_layers=2,
                             llm_steps=400, llm_batch=64, llm_lr=0.002, llm_questions=2),
                  pformer=80, stage1=40, stage2=100, log_interval=5, scorers="['BLEU','CIDEr']"),
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}  # nothing from the Hub; each step uses all cores (torch's default)


def run(name, cmd, timings):
    """Run one step as a subprocess, echo its output, time it. A SIGTERM sent to this driver (a scheduler's
    pre-emption, kill) goes on to the step, which saves a checkpoint and exits; the driver waits for it, then stops.
    Ctrl-C reaches the step from the terminal already (one process group): the driver only waits for it, since a
    second SIGINT would make the step stop at once, without its checkpoint."""
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    child = subprocess.Popen([sys.executable, *cmd], env=ENV)
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum)),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    timings[name] = timings.get(name, 0.0) + time.time() - t0
    if code != 0:
        raise SystemExit(f"{name} stopped (exit code {code}); run the same command again to continue")


def digest(*parts):
    """A short hash of JSON-able parts: the identity of a result, from what produced it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def identity(path):
    """What a result was made from: a world directory's world.json (its settings and the hashes of its backbones),
    or a checkpoint's recipe.json (written by train() below). None for anything else."""
    for record in (os.path.join(path, "world.json"), os.path.join(os.path.dirname(path), "recipe.json")):
        if os.path.isfile(record):
            with open(record) as f:
                return digest(json.load(f))
    return None


def recipe(script, args):
    """A stage's recipe: its script, its arguments, and the identity of every world or checkpoint they name (a
    rebuilt world, or a retrained parent stage, is a new recipe)."""
    paths = [a.split("=", 1)[1] for a in args if "=" in a]
    identities = {p: identity(p) for p in paths if os.path.exists(p)}
    return dict(script=script, args=list(args), inputs={p: i for p, i in identities.items() if i is not None})


def train(name, script, config, out_dir, steps, data, timings, *extra):
    """A training stage, unless its checkpoint already reached `steps` with the same recipe (script, arguments, and
    the identities of the world and the checkpoints it starts from); resumed if it stopped before; redone from
    scratch if anything it depends on changed. The config file's data and backbone paths under data/quickstart (or
    data/video) are moved to `data`; `extra` comes last and wins. Returns the checkpoint's path."""
    from checkpoints import read_checkpoint

    ckpt, record = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "recipe.json")
    args = [config, f"--out_dir={out_dir}", f"--max_steps={steps}", f"--lr_decay_steps={steps}"]
    with open(config) as f:  # the config's world is data/quickstart or data/video
        args += [re.sub(r"data/(quickstart|video)", data, f"--{line.split('=')[0].strip()}="
                        f"{line.split('=', 1)[1].split('#')[0].strip()}") for line in f
                 if re.search(r"data/(quickstart|video)", line) and not line.startswith("#")]
    args += extra
    wanted = recipe(script, args + [f"--world={data}"])
    if os.path.isfile(ckpt):
        same = read_json(record) == wanted
        step = read_checkpoint(ckpt)["step"]
        if same and step >= steps:
            print(f"=== {name}: done already ({ckpt} at step {step})")
            return ckpt
        if same:
            args.append("--init_from=resume")
        else:
            print(f"=== {name}: {out_dir} was made from other settings or inputs: training it again")
            args.append("--overwrite=True")
    os.makedirs(out_dir, exist_ok=True)
    write_json(record, wanted, indent=1)
    run(name, [script, *args], timings)
    return ckpt


def read_json(path):
    """The JSON in `path`, or None where there is none."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def evaluate(name, ckpt, task, ann, out_dir, data, timings, scorers, media="images"):
    """eval.py on the held-out scenes (or clips: media="videos"), unless its metrics were computed with the same
    arguments from the same checkpoint (its identity) and the same world."""
    metrics, record = os.path.join(out_dir, f"{task}_metrics.json"), os.path.join(out_dir, f"{task}_recipe.json")
    args = [f"--task={task}", f"--ckpt={ckpt}", f"--ann_file={data}/{ann}", f"--image_root={data}/{media}",
            f"--out_dir={out_dir}", "--device=cpu", "--num_workers=0", "--batch_size=50", "--min_new_tokens=1",
            "--log_every=1000", f"--caption_scorers={scorers}"]
    wanted = recipe("eval.py", args + [f"--world={data}"])
    if not (os.path.isfile(metrics) and read_json(record) == wanted):
        run(name, ["eval.py", *args], timings)
        write_json(record, wanted, indent=1)
    with open(metrics) as f:
        return json.load(f)["metrics"]


def blind_baselines(data, questions, items):
    """Answers and a caption chosen without looking at the image: the most frequent answer, the most frequent
    answer to each question in the text corpus, and the most common training caption (its CIDEr)."""
    import metrics as M

    with open(f"{data}/corpus_qa.txt") as f:  # the answers of the text corpus (no image-question pairs exist)
        corpus_qa = [line.rstrip("\n").split(M.VQA_PROMPT.split("{}")[1] + " ") for line in f]
    top_answer = Counter(a for _, a in corpus_qa).most_common(1)[0][0]
    by_question = {}
    for q, a in corpus_qa:
        by_question.setdefault(q, Counter())[a] += 1
    prior = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    with open(f"{data}/train.json") as f:
        top_caption = Counter(c for a in json.load(f) for c in a["caption"]).most_common(1)[0][0]
    references = {it["image_id"]: it["captions"] for it in items}
    return {"top answer": M.generic_vqa_scores({q["question_id"]: top_answer for q in questions}, questions),
            "answer per question": M.generic_vqa_scores(
                {q["question_id"]: prior.get("Question: " + q["question"], top_answer) for q in questions}, questions),
            "top caption CIDEr": M.caption_metrics({i: top_caption for i in references}, references,
                                                   ["CIDEr"]).get("CIDEr")}


def true_caption_vqa(data, questions):
    """The frozen LLM answering each question after the scene's true caption as text, in place of the soft prompt
    (the document "</s> caption \\n" before the question's own BOS, as in its pretraining pages), with eval.py's
    generation and scoring: what a perfect description of the image gets from this LLM."""
    import metrics as M
    from backbones import FrozenLLM
    from eval import VQA_PROMPT
    from world import scene_caption

    llm = FrozenLLM.from_pretrained(f"{data}/llm")
    with open(f"{data}/test_captions.json") as f:
        scenes = {it["image"]: it["scene"] for it in json.load(f)}
    answers = {}
    for i in range(0, len(questions), 50):
        chunk = questions[i:i + 50]
        t = llm.tokenize([scene_caption(scenes[q["image"]]) + "\n" for q in chunk], padding_side="left")
        out = llm.generate_tokens(llm.embed(t.input_ids), prompt_mask=t.attention_mask,
                                  prompt=[VQA_PROMPT.format(q["question"]) for q in chunk],
                                  num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=0.0)
        answers.update(zip([q["question_id"] for q in chunk], llm.decode(out)))
    return M.generic_vqa_scores(answers, questions)


def caption_attributes(r, data, ann="test_captions.json"):
    """What the model's captions of the held-out scenes get right, object by object (world.caption_attribute_hits):
    percent of objects whose colour, shape and size they name right, and of captions naming as many objects."""
    import world

    with open(f"{data}/{ann}") as f:
        scenes = {it["image"]: it["scene"] for it in json.load(f)}
    with open(f"{r['dir']}/eval/caption_captions.json") as f:
        captions = {c["image_id"]: c["caption"] for c in json.load(f)}
    return world.caption_attribute_accuracy(captions, scenes)


def results_table(results, blind, oracle, timings, total):
    rows = [("blind: most frequent answer / most common caption", blind["top answer"]["overall"],
             blind["top caption CIDEr"]),
            ("blind: most frequent answer to each question in the text corpus",
             blind["answer per question"]["overall"], None)]
    rows += [(name, r["vqa"]["overall"], r["caption"].get("CIDEr")) for name, r in results.items()]
    rows += [("the frozen LLM reading the true caption as text, in place of the soft prompt", oracle["overall"], None)]
    lines = ["| model | zero-shot VQA accuracy (%) | caption CIDEr |", "|---|---|---|"]
    lines += [f"| {n} | {v:.1f} | {'' if c is None else f'{c:.3f}'} |" for n, v, c in rows]
    types = sorted(k for k in oracle if k not in ("overall", "scored", "missing", "empty"))
    lines += ["", "| VQA accuracy by question type (%) | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
    lines += ["| blind: most frequent answer to each question | " + " | ".join(
        f"{blind['answer per question'][t]:.1f}" for t in types) + " |"]
    lines += [f"| {n} | " + " | ".join(f"{r['vqa'][t]:.1f}" for t in types) + " |" for n, r in results.items()]
    lines += ["| the LLM reading the true caption | " + " | ".join(f"{oracle[t]:.1f}" for t in types) + " |"]
    attrs = ["color", "shape", "size", "count"]
    lines += ["", "| objects named right in the captions (%) | colour | shape | size | number of objects |",
              "|---|---|---|---|---|"]
    lines += [f"| {n} | " + " | ".join(f"{r['caption_attributes'][a]:.1f}" for a in attrs) + " |"
              for n, r in results.items()]
    lines += ["", "| step | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += [f"| total | {total:.0f} |"]
    lines += ["", f"Caption metrics tokenised with: {next(iter(results.values()))['caption'].get('tokenizer')}"]
    lines += ["", "One training seed per model: experiment.py measures how far the gap between the two models moves "
                  "with the seed and with a rebuilt world."]
    return "\n".join(lines)


def draw_pictures(results, questions, items, data, out, n_show=6):
    """samples.png (held-out scenes, each model's caption and answers) and losses.png (every stage's curves)."""
    import plots

    said = {}
    for name, r in results.items():
        with open(f"{r['dir']}/eval/vqa_answers.json") as f:
            answers = {a["question_id"]: a["answer"] for a in json.load(f)}
        with open(f"{r['dir']}/eval/caption_captions.json") as f:
            said[name] = answers, {c["image_id"]: c["caption"] for c in json.load(f)}
    samples = []
    for it in items[:n_show]:
        lines = [("truth", it["captions"][0], "black")]
        lines += [(name, captions.get(it["image_id"], ""), "navy") for name, (_, captions) in said.items()]
        for q in [q for q in questions if q["image"] == it["image"]][:3]:
            got = " / ".join(said[name][0].get(q["question_id"], "") for name in said)
            lines.append((q["question"], f"{got} (truth: {q['answers'][0]})", "darkgreen"))
        samples.append((os.path.join(data, "images", it["image"]), lines))
    plots.sample_grid(samples, f"{out}/samples.png")
    logs = [("P-Former stage 0", f"{out}/pformer/log.jsonl")]
    for name, r in results.items():
        logs += [(f"{name}: stage 1", f"{r['dir']}/stage1/log.jsonl"),
                 (f"{name}: stage 2", f"{r['dir']}/stage2/log.jsonl")]
    plots.loss_curves(logs, f"{out}/losses.png")


def main(size="full", data="data/quickstart", out="out/quickstart"):
    S, timings, t_start = SIZES[size], {}, time.time()
    run("world + backbones", ["world.py", "--quickstart", f"--out={data}",
                              *[f"--{k}={v}" for k, v in S["world"].items()]], timings)
    log = f"--log_interval={S['log_interval']}"
    train("P-Former stage 0", "train_pformer.py", "config/quickstart_pformer.py", f"{out}/pformer", S["pformer"],
          data, timings, log)
    results = {}
    for name, extra in [("BLIP-2", []), ("BLIP-2 + P-Former", [f"--pformer_ckpt={out}/pformer/ckpt.pt"])]:
        d = f"{out}/{'blip2' if not extra else 'blip2_pformer'}"
        train(f"{name}: stage 1", "train_stage1.py", "config/quickstart_stage1.py", f"{d}/stage1", S["stage1"],
              data, timings, log, *extra)
        train(f"{name}: stage 2", "train_stage2.py", "config/quickstart_stage2.py", f"{d}/stage2", S["stage2"],
              data, timings, log, f"--stage1_ckpt={d}/stage1/ckpt.pt", *extra)
        ckpt = f"{d}/stage2/ckpt.pt"
        results[name] = dict(dir=d, vqa=evaluate(f"{name}: eval VQA", ckpt, "vqa", "test_vqa.json", f"{d}/eval",
                                                 data, timings, S["scorers"]),
                             caption=evaluate(f"{name}: eval captions", ckpt, "caption", "test_captions.json",
                                              f"{d}/eval", data, timings, S["scorers"]))
        results[name]["caption_attributes"] = caption_attributes(results[name], data)

    import metrics as M

    questions = M.load_vqa_list(f"{data}/test_vqa.json")
    items = M.load_caption_task("caption", f"{data}/test_captions.json")
    blind, oracle = blind_baselines(data, questions, items), true_caption_vqa(data, questions)
    total = time.time() - t_start
    table = results_table(results, blind, oracle, timings, total)
    print("\n" + table)
    with open(f"{out}/results.md", "w") as f:
        f.write(table + "\n")
    with open(f"{out}/results.json", "w") as f:
        json.dump({"results": results, "blind": blind, "true_caption_vqa": oracle, "seconds": timings,
                   "total_seconds": total}, f, indent=1)
    draw_pictures(results, questions, items, data, out)
    print(f"\nwrote {out}/results.md, {out}/samples.png, {out}/losses.png ({total:.0f}s in all)")


# -----------------------------------------------------------------------------
# the same on video: python quickstart.py --video

VIDEO_SIZES = {
    "full": dict(world={}, pformer=300, stage1=150, stage2=600, log_interval=50, captions=True),
    # the test's size: half the clips (telling left from right takes about 1500; 600 were too few), about half the
    # LLM's steps, stage 2 alone (400 steps: 95% on direction with seeds 0 and 1), video QA alone
    "small": dict(world=dict(n_train=1500, n_test=60, llm_steps=800), pformer=60, stage1=0, stage2=400,
                  log_interval=10, captions=False),
}


def main_video(size="full", data="data/video", out="out/quickstart_video"):
    """The video world (clips of a shape moving left or right): P-Former stage 0 on its text, then stages 1
    and 2 on 4-frame clips and on single frames, with and without P-Former (the small size: stage 2 alone, three
    runs, QA alone), zero-shot video QA and captions; a table in out/results.md."""
    S, timings, t_start = VIDEO_SIZES[size], {}, time.time()
    run("video world", ["world.py", "--video", f"--out={data}", *[f"--{k}={v}" for k, v in S["world"].items()]],
        timings)
    log, pformer = f"--log_interval={S['log_interval']}", f"--pformer_ckpt={out}/pformer/ckpt.pt"
    train("P-Former stage 0", "train_pformer.py", "config/video_world_pformer.py", f"{out}/pformer", S["pformer"],
          data, timings, log)
    arms = [("BLIP-2, 4 frames", "4", []), ("BLIP-2, 1 frame", "1", []),
            ("BLIP-2 + P-Former, 4 frames", "4", [pformer])]
    arms += [("BLIP-2 + P-Former, 1 frame", "1", [pformer])] if size == "full" else []
    results = {}
    for name, frames, extra in arms:
        d = f"{out}/{name.replace(' ', '').replace(',', '_').replace('+', '_').lower()}"
        stage1 = f"--stage1_ckpt={d}/stage1/ckpt.pt" if S["stage1"] else "--stage1_ckpt="
        if S["stage1"]:
            train(f"{name}: stage 1", "train_stage1.py", "config/video_world_stage1.py", f"{d}/stage1", S["stage1"],
                  data, timings, log, f"--num_frames={frames}", *extra)
        train(f"{name}: stage 2", "train_stage2.py", "config/video_world_stage2.py", f"{d}/stage2", S["stage2"],
              data, timings, log, f"--num_frames={frames}", stage1, *extra)
        ckpt = f"{d}/stage2/ckpt.pt"
        results[name] = dict(dir=d, vqa=evaluate(f"{name}: eval QA", ckpt, "video_qa", "test_qa.json", f"{d}/eval",
                                                 data, timings, "['CIDEr']", media="videos"))
        if S["captions"]:
            results[name]["caption"] = evaluate(f"{name}: eval captions", ckpt, "video_caption", "test_captions.json",
                                                f"{d}/eval", data, timings, "['CIDEr']", media="videos")
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
    with open(f"{out}/results.md", "w") as f:
        f.write(table + "\n")
    with open(f"{out}/results.json", "w") as f:
        json.dump({"results": results, "blind": blind, "seconds": timings}, f, indent=1)
    return results, blind


if __name__ == "__main__":
    video = "--video" in sys.argv
    options = dict(size="full", data="data/video" if video else "data/quickstart",
                   out="out/quickstart_video" if video else "out/quickstart")
    for arg in [a for a in sys.argv[1:] if a != "--video"]:  # --key=value
        key, _, value = arg.lstrip("-").partition("=")
        if key not in options:
            raise SystemExit(f"unknown option {arg}: --video, --size=full|small, --data=DIR, --out=DIR")
        options[key] = value
    (main_video if video else main)(**options)

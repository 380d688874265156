"""
The quick start: the whole method end to end on a laptop CPU, offline. Each step is one of the repository's
scripts, run as you would run it by hand with a config file:

    world.py --quickstart     scenes, captions, questions, a text corpus; a ViT and an OPT pretrained on them
    train_pformer.py          P-Former stage 0 on the text corpus
    train_stage1.py           BLIP-2 stage 1, twice: plain, and aligned to the P-Former
    train_stage2.py           BLIP-2 stage 2, twice, likewise
    eval.py                   zero-shot VQA and captioning on the held-out scenes, for both runs

then a table of the results next to blind baselines, a picture of held-out scenes with what each model said
(out/quickstart/samples.png) and the loss curves of every stage (out/quickstart/losses.png).

    python quickstart.py                  # the full size (make quickstart)
    python quickstart.py --size=small     # a minute or two (tests/test_quickstart.py)

Everything already done is reused: the world, and every stage whose checkpoint reached its last step; a stage
that was interrupted continues from its checkpoint (init_from=resume).
"""
import json
import os
import subprocess
import sys
import time
from collections import Counter

import torch
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# config
size = "full"  # 'full' or 'small'
data = "data/quickstart"
out = "out/quickstart"
SIZES = {  # world.py settings and the steps of each stage
    "full": dict(world={}, pformer=300, stage1=150, stage2=300),
    "small": dict(world=dict(n_train=300, n_test=24, n_text=3000, vit_steps=120, llm_steps=300),
                  pformer=80, stage1=60, stage2=60),
}
for arg in sys.argv[1:]:  # --key=value
    key, _, value = arg.lstrip("-").partition("=")
    if key not in ("size", "data", "out"):
        raise SystemExit(f"unknown option {arg}: --size=full|small, --data=DIR, --out=DIR")
    globals()[key] = value
S = SIZES[size]
# -----------------------------------------------------------------------------

# nothing from the Hub; each step uses all cores (torch's default; 1.5x faster than one thread on 2 cores)
env = {**os.environ, "HF_HUB_OFFLINE": "1"}
timings = {}


def run(name, cmd):
    """Run one step as a subprocess, echo its output, time it."""
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, *cmd], check=True, env=env)
    timings[name] = time.time() - t0


def train(name, script, config, out_dir, steps, *extra):
    """A training stage, unless its checkpoint already reached `steps`; resumed if it stopped before."""
    ckpt = os.path.join(out_dir, "ckpt.pt")
    args = [config, f"--out_dir={out_dir}", f"--max_steps={steps}", f"--lr_decay_steps={steps}"]
    with open(config) as f:  # the data and backbone paths of the config, moved to --data
        args += [f"--{line.split('=')[0].strip()}={line.split('=', 1)[1].split('#')[0].strip()}"
                 .replace("data/quickstart", data) for line in f
                 if "data/quickstart" in line and not line.startswith("#")]
    if os.path.isfile(ckpt):
        step = torch.load(ckpt, map_location="cpu", weights_only=False)["step"]
        if step >= steps:
            print(f"=== {name}: done already ({ckpt} at step {step})")
            return
        args.append("--init_from=resume")
    run(name, [script, *args, *extra])


def evaluate(name, ckpt, task, ann, out_dir):
    metrics = os.path.join(out_dir, f"{task}_metrics.json")
    if not (os.path.isfile(metrics) and os.path.getmtime(metrics) > os.path.getmtime(ckpt)):
        run(name, ["eval.py", f"--task={task}", f"--ckpt={ckpt}", f"--ann_file={data}/{ann}",
                   f"--image_root={data}/images", f"--out_dir={out_dir}", "--device=cpu", "--num_workers=0",
                   "--batch_size=50", "--min_new_tokens=1", "--log_every=1000"])
    with open(metrics) as f:
        return json.load(f)["metrics"]


# -----------------------------------------------------------------------------
# the pipeline

t_start = time.time()
world_args = [f"--{k}={v}" for k, v in S["world"].items()]
run("world + backbones", ["world.py", "--quickstart", f"--out={data}", *world_args])
train("P-Former stage 0", "train_pformer.py", "config/quickstart_pformer.py", f"{out}/pformer", S["pformer"])
pformer_ckpt = f"{out}/pformer/ckpt.pt"
results = {}
for run_name, extra in [("BLIP-2", []), ("BLIP-2 + P-Former", [f"--pformer_ckpt={pformer_ckpt}"])]:
    d = f"{out}/{'blip2' if not extra else 'blip2_pformer'}"
    train(f"{run_name}: stage 1", "train_stage1.py", "config/quickstart_stage1.py", f"{d}/stage1", S["stage1"],
          *extra)
    train(f"{run_name}: stage 2", "train_stage2.py", "config/quickstart_stage2.py", f"{d}/stage2", S["stage2"],
          f"--stage1_ckpt={d}/stage1/ckpt.pt", *extra)
    ckpt = f"{d}/stage2/ckpt.pt"
    results[run_name] = dict(
        dir=d,
        vqa=evaluate(f"{run_name}: eval VQA", ckpt, "vqa", "test_vqa.json", f"{d}/eval"),
        caption=evaluate(f"{run_name}: eval captions", ckpt, "caption", "test_captions.json", f"{d}/eval"))
# -----------------------------------------------------------------------------
# blind baselines: an answer / a caption chosen without looking at the image

import eval as E  # noqa: E402  (after the runs: eval.py's metric half, for the baselines)

questions = E.load_vqa_list(f"{data}/test_vqa.json")
with open(f"{data}/corpus_qa.txt") as f:  # the answers of the text corpus (no image-question pairs exist)
    corpus_qa = [line.rstrip("\n").split(" Short answer: ") for line in f]
top_answer = Counter(a for _, a in corpus_qa).most_common(1)[0][0]
by_question = {}
for q, a in corpus_qa:
    by_question.setdefault(q, Counter())[a] += 1
prior = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
blind_vqa = E.generic_vqa_scores({q["question_id"]: top_answer for q in questions}, questions)["overall"]
blind_vqa_q = E.generic_vqa_scores({q["question_id"]: prior.get("Question: " + q["question"], top_answer)
                                    for q in questions}, questions)["overall"]
items = E.load_caption_task("caption", f"{data}/test_captions.json")


def true_caption_vqa(questions, context_len):
    """The frozen LLM answering each question with the scene's true caption in place of the soft prompt (its
    token embeddings, filled with <pad> to the soft prompt's length, as in the LLM's pretraining documents),
    through eval.py's generation and scoring: what a perfect description of the image would get from this LLM."""
    from data import scene_caption
    from model import FrozenLLM

    llm = FrozenLLM.from_pretrained(f"{data}/llm")
    with open(f"{data}/test_captions.json") as f:
        scenes = {it["image"]: it["scene"] for it in json.load(f)}
    pad, answers = llm.tokenizer.pad_token_id, {}
    for i in range(0, len(questions), 50):
        chunk = questions[i:i + 50]
        ids = [llm.tokenizer(scene_caption(scenes[q["image"]]), add_special_tokens=False).input_ids for q in chunk]
        ids = torch.tensor([x + [pad] * (context_len - len(x)) for x in ids])
        out = llm.generate_tokens(llm.embed(ids), prompt=[E.VQA_PROMPT.format(q["question"]) for q in chunk],
                                  num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=0.0)
        answers.update(zip([q["question_id"] for q in chunk], llm.decode(out)))
    return E.generic_vqa_scores(answers, questions)


with open(f"{data}/world.json") as f:
    oracle = true_caption_vqa(questions, json.load(f)["config"]["llm_context_len"])
total = time.time() - t_start
with open(f"{data}/train.json") as f:
    top_caption = Counter(c for a in json.load(f) for c in a["caption"]).most_common(1)[0][0]
references = {it["image_id"]: it["captions"] for it in items}
blind_cider = E.caption_metrics({i: top_caption for i in references}, references).get("CIDEr", float("nan"))

# -----------------------------------------------------------------------------
# the table

rows = [("most frequent answer / most common caption (blind)", blind_vqa, blind_cider),
        ("most frequent answer per question (blind, from the text)", blind_vqa_q, None)]
rows += [(name, r["vqa"]["overall"], r["caption"].get("CIDEr", float("nan"))) for name, r in results.items()]
rows += [("the frozen LLM reading the true caption as text, in place of the soft prompt", oracle["overall"], None)]
lines = ["| model | zero-shot VQA accuracy (%) | caption CIDEr |", "|---|---|---|"]
lines += [f"| {n} | {v:.1f} | {'' if c is None else f'{c:.3f}'} |" for n, v, c in rows]
types = sorted(k for k in next(iter(results.values()))["vqa"] if k not in ("overall", "scored", "missing", "empty"))
lines += ["", "| VQA accuracy by question type (%) | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
lines += [f"| {n} | " + " | ".join(f"{r['vqa'][t]:.1f}" for t in types) + " |" for n, r in results.items()]
lines += ["| the LLM reading the true caption | " + " | ".join(f"{oracle[t]:.1f}" for t in types) + " |"]
lines += ["", "| step | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in timings.items()]
lines += [f"| total | {total:.0f} |"]
table = "\n".join(lines)
print("\n" + table)
with open(f"{out}/results.md", "w") as f:
    f.write(table + "\n")
with open(f"{out}/results.json", "w") as f:
    json.dump({"results": results, "blind": {"vqa_top_answer": blind_vqa, "vqa_per_question": blind_vqa_q,
               "cider_top_caption": blind_cider, "top_answer": top_answer, "top_caption": top_caption},
               "true_caption_vqa": oracle,
               "seconds": timings, "total_seconds": total}, f, indent=1)

# -----------------------------------------------------------------------------
# pictures, drawn with PIL: held-out scenes with what each model said, and the loss curves


def read_answers(d):
    with open(f"{d}/eval/vqa_answers.json") as f:
        answers = {a["question_id"]: a["answer"] for a in json.load(f)}
    with open(f"{d}/eval/caption_captions.json") as f:
        captions = {c["image_id"]: c["caption"] for c in json.load(f)}
    return answers, captions


said = {name: read_answers(r["dir"]) for name, r in results.items()}
n_show, scale, text_w, line_h = 6, 3, 520, 12
cell_h = max(48 * scale, line_h * (2 + 3 * 2 + 3)) + 8
grid = Image.new("RGB", (48 * scale + text_w, cell_h * n_show), "white")
draw = ImageDraw.Draw(grid)
for k, it in enumerate(items[:n_show]):
    y = k * cell_h
    with Image.open(os.path.join(data, "images", it["image"])) as img:
        grid.paste(img.convert("RGB").resize((48 * scale, 48 * scale), Image.NEAREST), (0, y + 4))
    x, ty = 48 * scale + 8, y + 4
    draw.text((x, ty), f"truth: {it['captions'][0]}", fill=(0, 0, 0))
    ty += line_h
    for name, (answers, captions) in said.items():
        draw.text((x, ty), f"{name}: {captions.get(it['image_id'], '')}", fill=(0, 0, 160))
        ty += line_h
    for q in [q for q in questions if q["image"] == it["image"]][:3]:
        got = " / ".join(said[name][0].get(q["question_id"], "") for name in said)
        draw.text((x, ty), f"{q['question']} {got} (truth: {q['answers'][0]})", fill=(0, 110, 0))
        ty += line_h
grid.save(f"{out}/samples.png")


def loss_curves(logs, path, width=360, height=200):
    """One panel per stage: the training loss (blue) and, where logged, the validation loss (red)."""
    img = Image.new("RGB", (width * len(logs), height + 30), "white")
    draw = ImageDraw.Draw(img)
    for p, (title, log_path) in enumerate(logs):
        with open(log_path) as f:
            rows = [json.loads(line) for line in f]
        train_pts = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        val_pts = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r and "step" in r]
        x0, pts = p * width, train_pts + val_pts
        draw.text((x0 + 8, 4), title, fill=(0, 0, 0))
        if not pts:
            continue
        smax, lo, hi = max(s for s, _ in pts), min(v for _, v in pts), max(v for _, v in pts)
        box = (x0 + 40, 20, x0 + width - 10, height)
        draw.rectangle(box, outline=(160, 160, 160))
        draw.text((x0 + 2, 20), f"{hi:.2f}", fill=(0, 0, 0))
        draw.text((x0 + 2, height - 10), f"{lo:.2f}", fill=(0, 0, 0))
        draw.text((x0 + width - 60, height + 4), f"step {smax}", fill=(0, 0, 0))

        def xy(s, v):
            return (box[0] + (box[2] - box[0]) * s / max(smax, 1),
                    box[3] - (box[3] - box[1]) * (v - lo) / max(hi - lo, 1e-9))
        for series, color in [(train_pts, (0, 0, 200)), (val_pts, (200, 0, 0))]:
            if len(series) > 1:
                draw.line([xy(s, v) for s, v in series], fill=color, width=2)
    img.save(path)


logs = [("P-Former stage 0", f"{out}/pformer/log.jsonl")]
for name, r in results.items():
    logs += [(f"{name}: stage 1", f"{r['dir']}/stage1/log.jsonl"), (f"{name}: stage 2", f"{r['dir']}/stage2/log.jsonl")]
loss_curves(logs, f"{out}/losses.png")
print(f"\nwrote {out}/results.md, {out}/samples.png, {out}/losses.png ({total:.0f}s in all)")

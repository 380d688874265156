"""
Running the repository's scripts as the steps of a longer recipe (the quick start, the studies): each step runs as a
subprocess, exactly as you would run it by hand, and whatever is already done is reused.

    import runs
    timings = {}
    ckpt = runs.train("stage 1", "train_stage1.py", "config/quickstart_stage1.py", "out/x/stage1", 300,
                      "data/quickstart", timings, "--log_interval=20")
    metrics = runs.evaluate("eval VQA", ckpt, "vqa", "test_vqa.json", "out/x/eval", "data/quickstart", timings,
                            "['CIDEr']")

A result is reused when its recipe is unchanged: the script, its arguments, and the identity of the world and of
every checkpoint it starts from (a rebuilt world or a retrained parent stage makes a new recipe). A stage that was
interrupted resumes from its checkpoint (init_from=resume). Independent chains of steps (the quick start's two
models) can run at the same time, each on a share of the cores: side_by_side(lane, lane) with threads=lane_threads(2).
Run from the repository root: scripts and config files are named relative to it.
"""
import concurrent.futures
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

from metrics import provenance, write_atomic, write_json

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}  # nothing from the Hub; a step uses all cores unless given threads


_running = set()  # the steps running now: one, or one per lane of side_by_side()


def run(name, cmd, timings, threads=None, label=""):
    """Run one step, `python *cmd`, as a subprocess; echo its output (each line after "[label] " when given: lanes
    of side_by_side() print at once) and add its seconds to timings[name]. threads: the step's torch threads
    (OMP_NUM_THREADS), None for torch's default (all cores). A SIGTERM sent to this process (a scheduler's
    pre-emption, kill) goes on to the step, which saves a checkpoint and exits; this process waits for it, then
    stops. Ctrl-C reaches the step from the terminal already (one process group): this process only waits for it,
    since a second SIGINT would make the step stop at once, without its checkpoint."""
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    env = ENV if threads is None else {**ENV, "OMP_NUM_THREADS": str(threads)}
    if label:  # a piped child's Python would hold its lines back in a buffer
        env = {**env, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with passing_signals_on():
        child = subprocess.Popen([sys.executable, *cmd], env=env, text=True,
                                 **(dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT) if label else {}))
        _running.add(child)
        try:
            if label:
                for line in child.stdout:
                    print(f"[{label}] {line}", end="", flush=True)
            code = child.wait()
        finally:
            _running.discard(child)
    timings[name] = timings.get(name, 0.0) + time.time() - t0
    if code != 0:
        raise SystemExit(f"{name} stopped (exit code {code}); run the same command again to continue")


@contextlib.contextmanager
def passing_signals_on():
    """While inside: SIGTERM goes on to every running step, SIGINT is ignored (run()). Python lets only the main
    thread set signal handlers; side_by_side() sets them there for the steps its lanes run in other threads."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: [
                    child.send_signal(signum) for child in list(_running)]),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def side_by_side(*lanes):
    """Call each of `lanes` (a function that runs its steps one after another with run()) in its own thread, all at
    once; wait for every one, then return their results in order, or raise the first lane's error. A lane that
    fails leaves the others running to their end, so that a second run reuses what they did."""
    with passing_signals_on(), concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
        futures = [pool.submit(lane) for lane in lanes]
    return [f.result() for f in futures]


def lane_threads(lanes):
    """Torch threads for each of `lanes` steps run side by side: torch's default (the cores) shared out, at least one
    each."""
    import torch

    return max(1, torch.get_num_threads() // lanes)


def digest(*parts):
    """A short hash of JSON-able parts: the identity of a result, from what produced it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def read_json(path):
    """The JSON in `path`, or None where there is none."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def identity(path):
    """What a result was made from: a world directory's world.json (its settings and the hashes of its backbones),
    or a checkpoint's recipe.json (written by train()). None for anything else."""
    for record in (os.path.join(path, "world.json"), os.path.join(os.path.dirname(path), "recipe.json")):
        if os.path.isfile(record):
            return digest(read_json(record))
    return None


def recipe(script, args):
    """A step's recipe: its script, its arguments, and the identity of every world or checkpoint they name."""
    paths = [a.split("=", 1)[1] for a in args if "=" in a]
    identities = {p: identity(p) for p in paths if os.path.exists(p)}
    return dict(script=script, args=list(args), inputs={p: i for p, i in identities.items() if i is not None})


def train(name, script, config, out_dir, steps, world, timings, *args, threads=None, label=""):
    """A training stage: `script` with `config`, out_dir, steps (max_steps = lr_decay_steps) and `args` (last: they
    win), unless its checkpoint already reached `steps` with the same recipe; resumed if it stopped before; redone
    from scratch if anything it depends on changed. `world` is the directory of the world it trains on: its
    identity is part of the recipe (the arguments that point the config at its files are the caller's). Returns
    the checkpoint's path. threads and label: run()'s."""
    from checkpoints import read_checkpoint

    ckpt, record = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "recipe.json")
    args = [config, f"--out_dir={out_dir}", f"--max_steps={steps}", f"--lr_decay_steps={steps}", *args]
    wanted = recipe(script, args + [f"--world={world}"])
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
    run(name, [script, *args], timings, threads, label)
    return ckpt


def evaluate(name, ckpt, task, ann, out_dir, world, timings, scorers, media="images", threads=None, label=""):
    """eval.py zero-shot on the held-out scenes of `world` ({world}/{ann}, media under {world}/{media}: "images",
    or "videos" for clips) on the CPU, unless its metrics were computed with the same arguments from the same
    checkpoint (its identity) and the same world. Returns the metrics ({out_dir}/{task}_metrics.json). threads and
    label: run()'s."""
    metrics, record = os.path.join(out_dir, f"{task}_metrics.json"), os.path.join(out_dir, f"{task}_recipe.json")
    args = [f"--task={task}", f"--ckpt={ckpt}", f"--ann_file={world}/{ann}", f"--image_root={world}/{media}",
            f"--out_dir={out_dir}", "--device=cpu", "--num_workers=0", "--batch_size=50", "--min_new_tokens=1",
            "--log_every=1000", f"--caption_scorers={scorers}"]
    wanted = recipe("eval.py", args + [f"--world={world}"])
    if not (os.path.isfile(metrics) and read_json(record) == wanted):
        run(name, ["eval.py", *args], timings, threads, label)
        write_json(record, wanted, indent=1)
    return read_json(metrics)["metrics"]


def write_results(path, table, record):
    """A driver's results, each written atomically: {path}.md (the table, then a line naming what produced it) and
    {path}.json (the record, with "provenance": the commit, library versions and threads of metrics.provenance)."""
    made = provenance("cpu")
    footer = "produced by " + ", ".join(f"{k} {v}" for k, v in made.items())
    write_atomic(f"{path}.md", lambda f: f.write(table + "\n\n" + footer + "\n"))
    write_json(f"{path}.json", {**record, "provenance": made}, indent=1)

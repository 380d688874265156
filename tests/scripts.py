"""Running the repository's scripts inside the test process with runpy, as `python script.py args...` would run
them, but without a new interpreter that imports torch and transformers again each time (about 4 s on 2 cores)."""
import contextlib
import json
import io
import os
import runpy
import signal
import sys
import traceback
import warnings
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Hang(Exception):
    pass


def _hang(signum, frame):
    raise Hang("the script ran past its time limit")


def run_script(script, *args, ok=True, timeout=120):
    """Run ROOT/script with argv `args`; returns (returncode, stdout, stderr) as a namespace, stderr ending, on an
    error, with its traceback's last line "Error: message" as a real run's would. Warnings go to stderr as lines.
    A run past `timeout` seconds is stopped (SIGALRM) and fails the test rather than hanging the suite."""
    out, err = io.StringIO(), io.StringIO()
    argv, code, failure = sys.argv, 0, ""
    sys.argv = [script, *[os.path.join(ROOT, a) if a.startswith(("config/", "studies/config/")) else a for a in args]]
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
                if isinstance(e.code, str):  # Python prints a message given to SystemExit to stderr
                    err.write(e.code + "\n")
            except Exception:
                code, failure = 1, traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        sys.argv = argv
    stderr = err.getvalue() + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught) + failure
    result = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=stderr)
    assert (code == 0) == ok, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def tiny_data_args(w, shards=False):
    """The tiny configs' data and backbone paths, pointed at the tiny world `w` (conftest.tiny_world)."""
    train = [f"--train_shards={w}/shards/train-000.tar", "--train_ann=[]"] if shards else \
        [f"--train_ann=['{w}/train.json']", f"--train_image_roots=['{w}/images']"]
    return train + [f"--val_ann=['{w}/val.json']", f"--val_image_roots=['{w}/images']",
                    f"--vit_pretrained={w}/vit.pth"]


def tiny_sizes():
    """config/stage1_tiny.py's image encoder and Q-Former sizes as --key=value: what config/stage2_tiny.py needs
    to run from scratch (--stage1_ckpt=), since it otherwise takes them from the stage-1 checkpoint."""
    from checkpoints import MODEL_SIZES

    ns = {}
    with open(os.path.join(ROOT, "config", "stage1_tiny.py")) as f:
        exec(f.read(), ns)
    return [f"--{k}={ns[k]!r}" for k in MODEL_SIZES if k in ns]


def train_tiny(stage, w, out_dir, *args, ok=True, timeout=120):
    """train_stage{1,2}.py on config/stage{1,2}_tiny.py and the tiny world `w`, with `args` last (they win); a stage 2
    from scratch (--stage1_ckpt=) gets stage 1's sizes (tiny_sizes)."""
    extra = [f"--bert={w}/bert"] if stage == 1 else [f"--llm_model={w}/llm"]
    extra += tiny_sizes() if stage == 2 and "--stage1_ckpt=" in args else []
    return run_script(f"train_stage{stage}.py", f"config/stage{stage}_tiny.py", *tiny_data_args(w), *extra,
                      f"--out_dir={out_dir}", *args, ok=ok, timeout=timeout)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]

"""What a run that lasts days can count on, tried as a user would on the tiny configs: a nan never replaces a good
checkpoint, nothing hangs in silence, no checkpoint runs code, bad values fail at start naming their key, the log and
the out_dir survive restarts, validation reports real values, and resume is exact with DataLoader workers."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from backbones import FrozenLLM, read_state_dict
from model import read_checkpoint
from scripts import ROOT, read_log, run_script, train_tiny
from train_common import save_checkpoint

FAST = ["--log_interval=1", "--eval_interval=100", "--ckpt_interval=100"]


def weights(out_dir):
    return read_checkpoint(os.path.join(out_dir, "ckpt.pt"))["model"]


def last_line(p):
    return p.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- non-finite values


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_world, tmp_path):
    out = str(tmp_path / "run")
    train_tiny(1, tiny_world, out, "--max_steps=2", *FAST)
    good = open(os.path.join(out, "ckpt.pt"), "rb").read()
    p = train_tiny(1, tiny_world, out, "--init_from=resume", "--max_steps=8", "--lr=1e30", "--warmup_steps=0",
                   *FAST, ok=False)
    # step 3's update (lr 1e30) leaves weights near 1e30; step 4's forward overflows: its loss is the first nan
    assert "not finite (nan or inf) at step 4" in last_line(p) and "still holds the last good checkpoint" in last_line(p)
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == good  # untouched
    # a checkpoint with non-finite weights is never written, and never loaded
    path = str(tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="not writing .*bad.pt: weight w is not finite"):
        save_checkpoint(path, {"stage": 1, "model": {"w": torch.tensor([1.0, float("nan")])}})
    assert not os.path.exists(path)
    torch.save({"stage": 2, "model": {"w": torch.tensor([float("inf")])}}, path)
    with pytest.raises(ValueError, match=r"bad.pt holds non-finite weights \(nan or inf\) in w"):
        read_checkpoint(path)


# ---------------------------------------------------------------- data that cannot fill a batch


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def test_a_run_that_cannot_form_a_batch_stops_at_once_naming_the_data(tiny_world, tmp_path):
    import tarfile

    w = tiny_world
    with open(f"{w}/train.json") as f:
        small = write_json(tmp_path / "small.json", json.load(f)[:1])  # 3 captions, batch 16
    p = train_tiny(1, w, str(tmp_path / "a"), f"--train_ann=['{small}']", "--max_steps=2", ok=False, timeout=60)
    assert "small.json: 3 samples per rank, fewer than one batch of 16" in last_line(p)
    text = tmp_path / "three.txt"
    text.write_text("a red circle\na big blue square\na small green triangle\n")
    p = run_script("train_pformer.py", "config/pformer_tiny.py", f"--train_text=['{text}']", "--val_text=[]",
                   f"--bert={w}/bert", f"--llm_model={w}/llm", f"--out_dir={tmp_path / 'b'}", ok=False, timeout=60)
    assert "three.txt: 3 samples per rank, fewer than one batch of 16" in last_line(p)
    # tar shards: five samples; images without captions; random bytes: no batch in the first epoch
    few = tmp_path / "few.tar"
    with tarfile.open(f"{w}/shards/train-000.tar") as src, tarfile.open(few, "w") as dst:
        for member in src.getmembers()[:10]:
            dst.addfile(member, src.extractfile(member))
    no_text = tmp_path / "no_text.tar"
    with tarfile.open(f"{w}/shards/train-000.tar") as src, tarfile.open(no_text, "w") as dst:
        for member in src.getmembers():
            if member.name.endswith(".jpg"):
                dst.addfile(member, src.extractfile(member))
    noise = tmp_path / "noise.tar"
    noise.write_bytes(os.urandom(5000))
    for shard in (few, no_text, noise):
        p = train_tiny(1, w, str(tmp_path / shard.stem), f"--train_shards={shard}", "--train_ann=[]",
                       "--max_steps=2", ok=False, timeout=60)
        assert f"no batch of 16 samples could be formed from tar shards '{shard}'" in last_line(p), shard


# ---------------------------------------------------------------- checkpoints never run code


def test_no_checkpoint_runs_code(tiny_world, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    out = tmp_path / "run"
    out.mkdir()
    torch.save({"stage": 1, "model": {}, "step": 1, "x": Payload()}, out / "ckpt.pt")
    p = train_tiny(1, tiny_world, str(out), "--init_from=resume", "--max_steps=2", ok=False)
    assert "ckpt.pt holds objects other than tensors and plain values, which loading would run as code" in last_line(p)
    assert "weights_only=False" not in p.stderr and not marker.exists()
    with pytest.raises(ValueError, match="would run as code"):
        read_state_dict(str(out / "ckpt.pt"))
    assert not marker.exists()
    # every torch.load of the repository reads weights only (a grep that proves it)
    found = subprocess.run(["grep", "-rn", "--include=*.py", "torch.load(", ".", "--exclude-dir=.venv"], cwd=ROOT,
                           capture_output=True, text=True).stdout.splitlines()
    found = [line for line in found if not line.startswith("./tests/test_reliability.py")]  # this grep itself
    assert found and all("weights_only=True" in line for line in found), found


# ---------------------------------------------------------------- out_dir, log.jsonl and leftovers


def test_out_dir_log_and_leftovers(tiny_world, tmp_path):
    out = str(tmp_path / "run")
    train_tiny(1, tiny_world, out, "--max_steps=2", *FAST)
    # a run from scratch over an earlier run refuses, saying how to go on
    p = train_tiny(1, tiny_world, out, "--max_steps=2", *FAST, ok=False)
    assert "holds an earlier run: continue it with --init_from=resume, choose another --out_dir" in last_line(p)
    # a torn last line (disk full) and a temp file of a killed checkpoint write
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 1.2')
    leftover = os.path.join(out, "ckpt.pt.abc123.tmp")
    open(leftover, "wb").write(b"half")
    p = train_tiny(1, tiny_world, out, "--init_from=resume", "--max_steps=3", *FAST)
    assert "log.jsonl line 4 is not JSON (cut short?): dropped" in p.stderr  # lines: steps 1, 2, validation, torn
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3] and not os.path.exists(leftover)
    train_tiny(1, tiny_world, out, "--max_steps=1", "--overwrite=True", *FAST)  # asked for explicitly
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1]
    assert read_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 1


# ---------------------------------------------------------------- validation


def test_validation_reports_real_values_or_nothing(tiny_world, tmp_path):
    with open(f"{tiny_world}/val.json") as f:
        tiny_val = write_json(tmp_path / "val2.json", json.load(f)[:1])  # 3 captions, batch 16
    out = str(tmp_path / "small_val")
    train_tiny(2, tiny_world, out, f"--val_ann=['{tiny_val}']", "--max_steps=1", "--stage1_ckpt=", *FAST)
    val = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert len(val) == 1 and 0.1 < val[0] < 20, val  # the loss of those 3 captions, not a made-up 0
    out = str(tmp_path / "no_val")
    train_tiny(2, tiny_world, out, "--eval_batches=0", "--max_steps=1", "--stage1_ckpt=", *FAST)
    assert not any("val_loss" in r for r in read_log(out))


# ---------------------------------------------------------------- config values


@pytest.mark.parametrize("arg, key", [("--log_interval=0", "log_interval"), ("--ckpt_interval=0", "ckpt_interval"),
                                      ("--grad_accum=0", "grad_accum"), ("--batch_size=0", "batch_size"),
                                      ("--dtype=float8", "dtype"), ("--betas=(0.9,)", "betas"),
                                      ("--init_from=latest", "init_from")])
def test_bad_config_values_fail_at_start_naming_the_key(tiny_world, tmp_path, arg, key):
    p = train_tiny(1, tiny_world, str(tmp_path / "run"), arg, ok=False)
    assert last_line(p).startswith(f"ValueError: config key '{key}'") and "model" not in p.stdout, p.stdout


# ---------------------------------------------------------------- exact resume with workers


def test_exact_resume_with_workers_and_augmentation(tiny_world, tmp_path):
    """Two DataLoader workers and random crops and flips: stopped at step 3 and resumed to 6 equals 6 straight,
    since each sample's augmentation is seeded from its position in the run, not from a worker's random state."""
    common = ["--lr_decay_steps=6", "--warmup_steps=2", "--num_workers=2", "--augment=True", "--dropout=0.1",
              "--val_ann=[]", *FAST]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_tiny(1, tiny_world, full, "--max_steps=6", *common)
    train_tiny(1, tiny_world, part, "--max_steps=3", *common)
    train_tiny(1, tiny_world, part, "--max_steps=6", "--init_from=resume", *common)
    a, b = weights(full), weights(part)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [r["loss"] for r in read_log(part)] == pytest.approx([r["loss"] for r in read_log(full)], abs=1e-5)
    # another batch size: the data position is re-mapped (said on the way), not silently misread
    p = train_tiny(1, tiny_world, part, "--max_steps=7", "--init_from=resume", "--batch_size=8", *common)
    assert "resuming with batch_size, world size = (8, 1) instead of (16, 1)" in p.stdout


# ---------------------------------------------------------------- backbones with missing weights


def test_backbones_with_missing_weights_are_an_error(tiny_world, tmp_path):
    import shutil

    from pretrained import init_from_bert

    llm = tmp_path / "llm"
    shutil.copytree(f"{tiny_world}/llm", llm)
    weights_file = llm / "model.safetensors"
    state = load_file(weights_file)
    key = next(k for k in state if "layers.1.fc1.weight" in k)
    save_file({k: v for k, v in state.items() if k != key}, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"LLM '.*llm': its checkpoint lacks weights for .*layers\.1\.fc1\.weight"):
        FrozenLLM.from_pretrained(str(llm))
    bert = tmp_path / "bert"
    shutil.copytree(f"{tiny_world}/bert", bert)
    state = load_file(bert / "model.safetensors")
    key = next(k for k in state if "encoder.layer.0.attention.self.query.weight" in k)
    save_file({k: v for k, v in state.items() if k != key}, bert / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"BERT '.*bert': its checkpoint lacks weights for .*layer\.0\.attention"):
        init_from_bert(torch.nn.Module(), str(bert))


def test_the_paper_recipes_run_the_frozen_llm_as_the_official_code_does():
    """The official code leaves OPT in train mode (its dropout on); the paper's recipes do the same, the tiny and
    quick-start ones keep the frozen LLM deterministic (the default)."""
    def config(name):
        ns = {}
        exec(open(os.path.join(ROOT, "config", name)).read(), ns)
        return ns

    assert config("stage2_vitg_opt2.7b_4m.py")["llm_dropout"] is True
    assert config("pformer_opt2.7b_4m.py")["llm_dropout"] is True
    assert "llm_dropout" not in config("stage2_tiny.py")

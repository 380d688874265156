"""What a run that lasts days can count on, tried as a user would on the tiny configs: a nan never replaces a good
checkpoint, nothing hangs in silence, no checkpoint runs code, bad values fail at start naming their key, the log and
the out_dir survive restarts, validation reports real values, and resume is exact with DataLoader workers."""

import json
import math
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backbones import FrozenLLM, read_state_dict
from checkpoints import read_checkpoint
from scripts import ROOT, read_log, run_script, tiny_data_args, train_tiny
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
                   "--resume_changes=True", *FAST, ok=False)
    # step 3's update (lr 1e30) leaves weights near 1e30; step 4's forward overflows: its loss is the first nan
    assert "not finite (nan or inf) at step 4" in last_line(p) and "still holds the last good checkpoint" in last_line(p)
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == good  # untouched
    # the batch of that step is named, in full in a file beside the checkpoint
    listing = os.path.join(out, "nonfinite_step4.txt")
    assert f"Its batch held 16 files ({tiny_world}/images/" in last_line(p) and f"all in {listing})" in last_line(p)
    assert len(open(listing).read().splitlines()) == 16
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


# ---------------------------------------------------------------- bad samples are skipped and named


def feature_world(tmp_path, n=32, width=12, segments=5):
    """n clips as pre-extracted features (root/clip_i.npy, segments x width) and their caption file."""
    root = tmp_path / "features"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(root / f"clip_{i}.npy", rng.standard_normal((segments, width)).astype(np.float32))
    ann = write_json(tmp_path / "clips.json", [{"video": f"clip_{i}.mp4", "caption": f"clip number {i}"}
                                               for i in range(n)])
    return root, ann


def test_feature_files_as_published_and_bad_ones_named(tmp_path):
    from data import ClipFeatureDataset, load_clip_features

    root, ann = feature_world(tmp_path, n=6)
    np.save(root / "clip_1.npy", np.ones((1, 4, 12), dtype=np.float32))  # the official VATEX files: 1 x S x F
    assert load_clip_features(str(root / "clip_1.mp4"), 5).shape == (4, 12)
    for i, bad in ((2, np.nan), (3, np.inf), (4, 1e30)):  # 1e30 is finite, but overflows in half precision
        a = np.zeros((5, 12), dtype=np.float32)
        a[2, 3] = bad
        np.save(root / f"clip_{i}.npy", a)
    np.save(root / "clip_5.npy", np.zeros((5, 10), dtype=np.float32))
    ds = ClipFeatureDataset(ann, str(root), num_frames=5, feature_dim=12)
    with pytest.warns(UserWarning) as record:
        item = ds[2]
    assert item["text"] == "clip number 0"  # 2, 3, 4 and 5 are bad: wrapped around
    messages = [str(w.message) for w in record]
    for i in (2, 3, 4):
        assert any(f"clip_{i}.npy: 1 values are nan, inf or beyond float16's range" in m for m in messages), messages
    assert any("clip_5.npy: 10 features per segment, feature_dim is 12" in m for m in messages), messages
    assert not any(".mp4" in m for m in messages) and item["skipped"] == 4 and torch.isfinite(item["image"]).all()
    strict = ClipFeatureDataset(ann, str(root), num_frames=5, feature_dim=12, strict=True)
    with pytest.raises(RuntimeError, match=r"clip_3\.npy: 1 values are nan"):
        strict[3]
    with pytest.warns(UserWarning, match=r"cannot read feature file .*clip_9\.npy: FileNotFoundError: No such file"):
        ClipFeatureDataset(write_json(tmp_path / "missing.json", [{"video": "clip_9.mp4", "caption": "x"},
                                                                  {"video": "clip_0.mp4", "caption": "y"}]),
                           str(root), 5)[0]


def test_a_run_skips_and_names_bad_feature_files(tiny_world, tmp_path):
    root, ann = feature_world(tmp_path)
    a = np.load(root / "clip_7.npy")
    a[0, 0] = np.nan
    np.save(root / "clip_7.npy", a)
    np.save(root / "clip_11.npy", np.zeros((5, 9), dtype=np.float32))
    args = [f"--train_ann=['{ann}']", f"--train_image_roots=['{root}']", "--val_ann=[]", "--feature_dim=12",
            "--num_frames=5", "--max_steps=4", *FAST]
    p = train_tiny(1, tiny_world, str(tmp_path / "run"), *args)
    assert "clip_7.npy: 1 values are nan" in p.stderr and "clip_11.npy: 9 features per segment" in p.stderr
    assert sum(r["skipped"] for r in read_log(str(tmp_path / "run")) if "skipped" in r) >= 2
    assert all(math.isfinite(r["loss"]) for r in read_log(str(tmp_path / "run")) if "loss" in r)
    p = train_tiny(1, tiny_world, str(tmp_path / "strict"), *args, "--strict_images=True", ok=False)
    assert re.search(r"RuntimeError: feature file .*clip_(7|11)\.npy", last_line(p)), last_line(p)


def test_clips_that_are_not_videos_and_containers_without_a_frame_count(tmp_path):
    import av
    from PIL import Image

    from data import load_annotations
    from video import decode_frames

    Image.new("RGB", (16, 16)).save(tmp_path / "photo.mp4", format="JPEG")
    with pytest.raises(ValueError, match=r"an image \(jpeg_pipe\), not a video"):
        decode_frames(str(tmp_path / "photo.mp4"), 4)
    with av.open(str(tmp_path / "audio.mp4"), "w", format="mp4") as c:
        stream = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            c.mux(packet)
    with pytest.raises(ValueError, match=r"no video stream in it \(audio only\?\)"):
        decode_frames(str(tmp_path / "audio.mp4"), 4)
    # mkv and webm store no frame count: sampled from duration x rate, the frames are the right ones
    for name, fmt, codec in (("a.mkv", "matroska", "libx264"), ("a.webm", "webm", "libvpx")):
        with av.open(str(tmp_path / name), "w", format=fmt) as c:
            stream = c.add_stream(codec, rate=8)
            stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
            for i in range(10):
                img = np.full((16, 16, 3), 20 * i, np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(packet)
            for packet in stream.encode():
                c.mux(packet)
        with av.open(str(tmp_path / name)) as c:
            assert c.streams.video[0].frames == 0  # what makes them different
        frames = decode_frames(str(tmp_path / name), 4, "uniform")
        assert [round(np.asarray(f).mean() / 20) for f in frames] == [0, 2, 5, 7], name
    # a WebVid entry without its caption
    webvid = write_json(tmp_path / "webvid.json", [{"videoid": "1", "name": "a dog"}, {"videoid": "2"}])
    with pytest.raises(ValueError, match=r"webvid.json entry 1: a WebVid entry \(\"videoid\"\) without \"name\""):
        load_annotations(webvid, "video")


# ---------------------------------------------------------------- pre-emption: SIGTERM and Ctrl-C


@pytest.mark.slow
def test_sigterm_ends_the_run_with_a_checkpoint_of_the_step_reached(tiny_world, tmp_path):
    """As a scheduler pre-empts a job: SIGTERM to every process of the run (DataLoader workers included)."""
    import signal
    import sys
    import time

    out = str(tmp_path / "run")
    cmd = [sys.executable, "train_stage1.py", "config/stage1_tiny.py", *tiny_data_args(tiny_world),
           f"--bert={tiny_world}/bert", f"--out_dir={out}", "--max_steps=1000", "--lr_decay_steps=1000",
           "--num_workers=2", "--val_ann=[]", *FAST]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (os.path.isfile(os.path.join(out, "log.jsonl")) and read_log(out)) and time.time() < deadline:
            assert p.poll() is None, p.communicate()
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGTERM)
        _, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    step = read_checkpoint(os.path.join(out, "ckpt.pt"))["step"]
    assert p.returncode == 128 + signal.SIGTERM and step >= 1, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (f"stopped by SIGTERM after step {step}: {out}/ckpt.pt holds it; "
                                               f"continue with --init_from=resume")
    assert not os.path.exists(os.path.join(out, "run.lock"))
    train_tiny(1, tiny_world, out, "--init_from=resume", f"--max_steps={step + 1}", "--lr_decay_steps=1000",
               "--num_workers=2", "--val_ann=[]", *FAST)
    assert read_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == step + 1


def test_stop_signals_in_one_process():
    import signal

    from train_common import StopSignals

    # Python's own Ctrl-C handler, as a script starts with (an earlier test in this process may have left another)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopSignals("cpu") as signals:
            assert signals.agreed() == 0
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: noted, the step goes on
            assert signals.agreed() == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C interrupts at once
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def _two_rank_worker(rank, port, out):
    import datetime
    import signal

    import torch.distributed as dist

    from train_common import NonFiniteWatch, StopSignals

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    signals = StopSignals("cpu")
    seen = []
    for step in range(3):
        if step == 1 and rank == 1:
            signals.received = signal.SIGTERM  # what the handler does, on rank 1 only
        seen.append(signals.agreed())
    watch = NonFiniteWatch("cpu", check_grads=False)
    for step, bad_on in ((0, ()), (1, (1,)), (2, (0, 1))):  # rank 1 goes bad first, at step 1
        loss = torch.tensor(float("nan") if rank in bad_on else 1.0)
        watch.record(step, loss, None, [f"rank{rank}_step{step}.jpg"])
    try:
        watch.check(os.path.join(out, "ckpt.pt"))
        message = ""
    except FloatingPointError as e:
        message = str(e)
    torch.save({"seen": seen, "message": message}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_stop_signals_and_nonfinite_watch_agree_across_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    from test_ddp import free_port

    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["seen"] == [0, 0, 15], result  # both ranks stop after the same step, one step later
        assert "not finite (nan or inf) at step 2" in result["message"], result
        assert "Its batch held 2 files (rank0_step1.jpg, rank1_step1.jpg; all in" in result["message"], result
    assert (tmp_path / "nonfinite_step2.txt").read_text() == "rank0_step1.jpg\nrank1_step1.jpg\n"


# ---------------------------------------------------------------- resume: the same run, one writer


def test_resume_refuses_changed_settings_or_data_unless_asked(tiny_world, tmp_path):
    out = str(tmp_path / "run")
    with open(f"{tiny_world}/train.json") as f:
        entries = json.load(f)
    data = write_json(tmp_path / "train.json", entries)
    args = [f"--train_ann=['{data}']", "--max_steps=2", *FAST]
    train_tiny(1, tiny_world, out, *args)
    p = train_tiny(1, tiny_world, out, *args, "--init_from=resume", "--max_steps=3", "--seed=7", "--dropout=0.2",
                   ok=False)
    assert "ckpt.pt was written with other settings: dropout 0.1 -> 0.2; seed 1337 -> 7. Resume with them anyway " \
           "with --resume_changes=True" in last_line(p)
    write_json(tmp_path / "train.json", entries[:-4])  # the same file name, fewer entries
    p = train_tiny(1, tiny_world, out, *args, "--init_from=resume", "--max_steps=3", ok=False)
    assert "other settings: the training data's files or captions changed" in last_line(p)
    # meant: said, and done
    p = train_tiny(1, tiny_world, out, *args, "--init_from=resume", "--max_steps=3", "--resume_changes=True")
    assert "resuming with changed settings (resume_changes=True): the training data's" in p.stdout
    assert read_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 3


def test_one_writer_per_out_dir(tiny_world, tmp_path):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    lock = out / "run.lock"
    sleeper = subprocess.Popen(["sleep", "60"])  # another run, alive on this host
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": "this morning"}))
        p = train_tiny(1, tiny_world, str(out), "--max_steps=1", *FAST, ok=False)
        assert last_line(p) == f"RuntimeError: {out} is in use by the run of pid {sleeper.pid} on " \
                               f"{socket.gethostname()} (since this morning): one run writes an out_dir at a time; " \
                               f"if that run is over, delete {lock}"
        assert not os.path.exists(out / "log.jsonl")
    finally:
        sleeper.kill()
        sleeper.wait()
    # that run is gone (killed without cleaning up): its lock is stale, taken over, and released at the end
    p = train_tiny(1, tiny_world, str(out), "--max_steps=1", *FAST)
    assert "taking over the stale lock of a run that is gone" in p.stderr and not lock.exists()


# ---------------------------------------------------------------- checkpoints: checksum, full disk


def test_a_flipped_bit_in_a_checkpoint_is_an_error(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    w = torch.arange(1000, dtype=torch.float32)
    save_checkpoint(path, {"stage": 1, "model": {"w": w}, "optimizer": {"state": {0: {"exp_avg": w * 2}}}})
    assert read_checkpoint(path)["model"]["w"].equal(w)
    raw = bytearray(open(path, "rb").read())
    for tensor in (w, w * 2):  # a weight, then the optimizer's state
        where = bytes(raw).find(tensor.numpy().tobytes()) + 2001
        raw[where] ^= 0x10
        open(path, "wb").write(raw)
        with pytest.raises(ValueError, match="ckpt.pt: its weights or optimizer state do not match the checksum"):
            read_checkpoint(path)
        raw[where] ^= 0x10
    open(path, "wb").write(raw)
    assert read_checkpoint(path)["model"]["w"].equal(w)


def test_a_full_disk_says_so_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"stage": 1, "model": {"w": torch.zeros(10)}})
    good = open(path, "rb").read()
    real_fdopen = os.fdopen

    class Full:  # a file on a disk that fills after 100 bytes
        def __init__(self, *args, **kwargs):
            self.f, self.written = real_fdopen(*args, **kwargs), 0

        def write(self, b):
            self.written += len(b)
            if self.written > 100:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", Full)
    with pytest.raises(OSError, match=r"no space left on device \(or quota\) writing .*ckpt.pt: the file "
                                      r"there, if any, is the previous one"):
        save_checkpoint(path, {"stage": 1, "model": {"w": torch.ones(10000)}})
    monkeypatch.undo()
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["ckpt.pt"]


def test_the_quick_start_driver_passes_sigterm_to_its_step_and_waits_for_it(tmp_path):
    """A scheduler's SIGTERM to a driver of runs.run (quickstart.py, the studies) reaches the running step, which
    saves and exits; the driver waits for it and stops with its exit code, never leaving the step running."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    step = ("import signal, sys, time; "
            "signal.signal(signal.SIGTERM, lambda *a: (print('step saved', flush=True), sys.exit(143))); "
            "print('step running', flush=True); time.sleep(60)")
    driver = subprocess.Popen([sys.executable, "-c", f"import runs; runs.run('a step', ['-c', {step!r}], {{}})"],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while driver.stdout.readline() != "step running\n":  # the step's own line, not the driver's echo of it
        assert time.time() - t0 < 60, "the step never started"
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=30)
    assert "step saved" in out and "exit code 143" in out and driver.returncode != 0, out



def test_side_by_side_runs_lanes_at_once_labels_their_lines_and_passes_sigterm_to_every_step(tmp_path):
    """runs.side_by_side (the quick start's two models): the lanes' steps run at the same time (each waits for a
    file the other writes), with the threads asked for, each line after its lane's label; a lane that fails lets
    the other finish, then stops the driver naming the failed step; a SIGTERM to the driver reaches every running
    step, which saves, and the driver waits for them."""
    import signal
    import sys
    import time

    (tmp_path / "step.py").write_text(
        "import os, signal, sys, time\n"
        "me, other, code = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('saved', flush=True), sys.exit(143)))\n"
        "open(me, 'w').close()\n"
        "t = time.time()\n"
        "while not os.path.exists(other):  # one after the other, the first step would wait here in vain\n"
        "    assert time.time() - t < 30, 'the other lane never ran beside this one'\n"
        "    time.sleep(0.05)\n"
        "print('running with threads', os.environ['OMP_NUM_THREADS'], flush=True)\n"
        "time.sleep(60 if code == 143 else 0)\n"
        "sys.exit(code)\n")

    def driver(code_b, code_a=0):
        lanes = [(me, other, code) for me, other, code in [("a", "b", code_a), ("b", "a", code_b)]]
        program = ("import runs\nt = {}\nruns.side_by_side(*[lambda me=me, other=other, code=code: runs.run("
                   "f'step {me}', ['step.py', me, other, str(code)], t, threads=1, label=me) "
                   f"for me, other, code in {lanes!r}])\n")
        return subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r})\n" + program],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    for code in (0, 3):
        for f in ("a", "b"):
            (tmp_path / f).unlink(missing_ok=True)
        run = driver(code)
        out, _ = run.communicate(timeout=120)
        assert "[a] running with threads 1" in out and "[b] running with threads 1" in out, out
        if code == 0:
            assert run.returncode == 0, out
        else:  # lane a's step ran to its end; the driver stops, naming lane b's
            assert run.returncode != 0 and "step b stopped (exit code 3)" in out, out

    for f in ("a", "b"):
        (tmp_path / f).unlink(missing_ok=True)
    run, seen, t0 = driver(143, 143), set(), time.time()
    while len(seen) < 2:
        line = run.stdout.readline()
        if line.endswith("running with threads 1\n"):
            seen.add(line)
        assert time.time() - t0 < 60, "the steps never started"
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=30)
    assert "[a] saved" in out and "[b] saved" in out and "exit code 143" in out and run.returncode != 0, out

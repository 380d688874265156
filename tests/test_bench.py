"""dev/bench.py at the tiny size: every stage runs in seconds and prints its fields, the FLOP accounting adds up, the HF
reference computes the same loss, and the cached-feature path equals the image path."""

import os
import re
import subprocess
import sys

import pytest
import torch

from dev import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_bench(monkeypatch):
    """bench's config set to the tiny size, restored after the test."""
    for key, value in dict(size="tiny", batch_size=4, steps=1, warmup=1, device="cpu", dtype="float32",
                           compare_hf=True, compile=False, cache=False, threads=1, stage=None, flops_only=False,
                           llm_layers=0, vit_layers=0).items():
        monkeypatch.setattr(bench, key, value)
    return bench


@pytest.mark.slow
def test_cli_runs_every_stage_and_prints_the_fields():
    cmd = [sys.executable, "-m", "dev.bench", "--size=tiny", "--steps=2", "--warmup=1", "--batch_size=4", "--threads=1",
           "--device=cpu", "--dtype=float32"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert re.search(r"^provenance: commit \S+ \| python .* \| torch_threads 1 \| device cpu$", out, re.M), out[:500]
    blocks = re.split(r"\n=== ", out)[1:]
    assert [b.split(",")[0] for b in blocks] == ["stage 0", "stage 1", "stage 2"]
    for b in blocks:
        for field in ("samples/s", "data", "forward", "backward", "optimizer", "forward by part", "GFLOP per sample",
                      "MFU", "peak memory"):
            assert field in b, (field, b)
    assert "VQ term" in blocks[0] and "of the stage-0 step" in blocks[0]
    assert "vit" in blocks[1] and "q-former" in blocks[1]
    assert "ours / HF step time" in blocks[2]
    ours, theirs = map(float, re.search(r"our loss ([\d.]+), HF loss ([\d.]+)", blocks[2]).groups())
    assert abs(ours - theirs) < 1e-4


def test_bad_stage_and_size_fail(tiny_bench):
    tiny_bench.size = "huge"
    with pytest.raises(ValueError, match="size must be one of tiny, small, real|size must be"):
        tiny_bench.main()
    tiny_bench.size, tiny_bench.stage = "tiny", 3
    with pytest.raises(ValueError, match="stage must be"):
        tiny_bench.main()


def test_flops_by_part_stage2(tiny_bench):
    (r,) = [tiny_bench.bench_stage(2)]
    flops = r["flops"]
    assert set(flops) == {"vit", "q-former", "llm", "rest"}
    assert flops["vit"][0] > 0 and flops["vit"][1] == 0  # frozen, run without autograd
    assert flops["q-former"][1] > flops["q-former"][0] > 0  # trainable: input and weight gradients
    # frozen LLM: the backward to the soft prompt computes input gradients only, about as much as the forward
    assert 0.5 * flops["llm"][0] < flops["llm"][1] < 1.5 * flops["llm"][0]
    assert flops["rest"][1] == 0 and 0 <= flops["rest"][0] < 0.05 * sum(f for f, _ in flops.values())
    assert r["ratio"] > 0 and r["mfu"] is None  # no MFU on CPU


def test_vq_flops_are_counted_stage0(tiny_bench):
    r = tiny_bench.bench_stage(0)
    B, Q = tiny_bench.batch_size, tiny_bench.SIZES["tiny"]["queries"]
    d, V = tiny_bench.SIZES["tiny"]["llm"][0], tiny_bench.SIZES["tiny"]["llm_vocab"]
    assert r["flops"]["vq"][0] == 2 * B * Q * V * d  # the distance matmul, chunk by chunk
    assert "vq" in r["parts"]


def test_cached_features_give_the_same_loss_and_skip_the_vit(tiny_bench, tmp_path):
    model, _, loss_fn, _ = tiny_bench.build(2, tiny_bench.sizes(), str(tmp_path))
    model.eval()
    batch = tiny_bench.make_batch(tiny_bench.sizes(), torch.Generator().manual_seed(0))
    images = batch["image"]
    with torch.no_grad():
        feats = model.visual(images)
        assert feats.shape == (images.shape[0], model.visual.num_tokens, model.visual.width)
        calls = []
        encode = model.visual.vit.forward_features
        model.visual.vit.forward_features = lambda x: (calls.append(1), encode(x))[1]
        cached = loss_fn(model, {"image": feats, "text": batch["text"]})["loss"]
        assert calls == []  # the encoder did not run
        assert torch.equal(cached, loss_fn(model, {"image": images, "text": batch["text"]})["loss"])
    model.train()
    loss_fn(model, {"image": feats, "text": batch["text"]})["loss"].backward()
    assert model.ln_vision.weight.grad is not None  # ln_vision still trains on cached features
    with pytest.raises(ValueError, match="expected images"):
        model.visual(feats[:, 1:])  # not this encoder's feature shape


def test_cache_option_runs(tiny_bench):
    tiny_bench.cache = True
    r = tiny_bench.bench_stage(2)
    assert r["flops"]["vit"] == [0, 0]  # the step never runs the encoder
    assert "ratio" in r


@pytest.mark.parametrize("stage", [0, pytest.param(1, marks=pytest.mark.slow), 2])  # stage 1's is the costly one
def test_flops_at_full_depth_equal_the_deep_models_count(tiny_bench, tmp_path, stage):
    """--flops_only extrapolates from 1- and 2-layer models; at depth 3 that equals counting the 3-layer model."""
    tiny_bench.llm_layers = tiny_bench.vit_layers = 3
    extrapolated = tiny_bench.flops_at_full_depth(stage)
    torch.manual_seed(0)
    model, _, loss_fn, parts = tiny_bench.build(stage, tiny_bench.sizes(), str(tmp_path), with_hf=False)
    model.train()
    counted = tiny_bench.count_flops(model, loss_fn, tiny_bench.make_batch(tiny_bench.sizes(),
                                                                          torch.Generator().manual_seed(0)), parts)
    assert extrapolated == counted
    deep = "llm" if stage == 0 else "vit"
    assert counted[deep][0] > 0


def test_flops_only_prints_the_gpu_ceilings(tiny_bench, capsys):
    tiny_bench.flops_only, tiny_bench.stage = True, 2
    (r,) = tiny_bench.main()
    out = capsys.readouterr().out
    assert "samples/s per GPU at 100% / 50% MFU: H100" in out
    assert r["flops_per_sample"] == sum(f + b for f, b in r["flops"].values()) / tiny_bench.batch_size


@pytest.mark.slow
def test_stage1_report_counts_less_work_after_than_before_as_on_one_of_8_ranks(tiny_bench):
    """The stage-1 report: as on 1 of 8 ranks, text padded to the longest caption and each image's keys and values
    computed once cost the Q-Former less than text padded to max_txt_len and 4 projections of every image; the
    counts on fake tensors equal those on real ones."""
    tiny_bench.cache = True
    r = tiny_bench.bench_stage(1)
    before, after = (sum(r["ddp"][name]["q-former"]) for name in ("before", "after"))
    assert after < 0.8 * before, (after, before)
    assert r["ddp"]["before"]["vit"] == [0, 0] and r["ddp_step_ratio"] > 0
    model, _, loss_fn, parts = tiny_bench.build(1, tiny_bench.sizes(), str(tiny_bench.tempfile.mkdtemp()),
                                                with_hf=False)
    batch = tiny_bench.make_batch(tiny_bench.sizes(), torch.Generator().manual_seed(0))
    batch["image"] = torch.zeros(len(batch["text"]), model.visual.num_tokens, model.visual.width)
    with tiny_bench.simulated_ranks(tiny_bench.STAGE1_RANKS):
        real = tiny_bench.count_flops(model.train(), loss_fn, batch, parts)
    assert tiny_bench.stage1_ddp_flops(model, loss_fn, batch, parts)["after"] == real


@pytest.mark.slow
def test_gpu_check_plumbing_on_cpu(tmp_path):
    """dev/gpu_check.sh --cpu, run from the repository root: every part runs although the tests fail before stage 0's
    benchmark, and the summary gives each stage's figures and the failing test with its first error line."""
    tests = tmp_path / "test_plumbing.py"
    tests.write_text("def test_ok():\n    pass\n\n\ndef test_bad():\n    assert 1 == 2, 'boom'\n")
    env = {**os.environ, "OUT": str(tmp_path / "logs"), "PYTHON": sys.executable, "GPU_CHECK_TESTS": str(tests)}
    p = subprocess.run(["bash", "dev/gpu_check.sh", "--cpu"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=env)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]  # a failed part
    summary = (tmp_path / "logs" / "summary.txt").read_text()
    for stage in (1, 2, 0):
        assert re.search(rf"stage {stage}: [\d.]+ img/s, MFU n/a .*, peak [\d.]+ GiB \[ok", summary), summary
    assert "tests: 1 failed, 1 passed [FAILED (exit 1)" in summary
    assert "test_bad - AssertionError: boom" in summary and "torch " in summary

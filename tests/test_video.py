"""Clips through the same Q-Former: T = 1 is the image model, image checkpoints load into clip models, the frame
embedding makes order matter, padded frames and padded feature segments change nothing, PyAV decodes exactly the
frames sampled, and bad videos are skipped and counted (or stop the run with strict)."""

import json
import os
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from data import ClipFeatureDataset, VideoTextDataset
from video import decode_frames, pad_clip, sample_frame_indices
from model import Blip2Stage1, Blip2Stage2
from pretrained import blip2_stage2_from_hf
from world import write_video

CAPTIONS = ["a red square", "two blue stars"]


def close(a, b, tol=1e-6):
    tiny.close(a, b, tol)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny.bert_dir(str(tmp_path_factory.mktemp("bert")))


def clips(n=2, T=3, seed=0):
    return torch.randn(n, T, 3, tiny.IMAGE, tiny.IMAGE, generator=torch.Generator().manual_seed(seed))


def stage2_pair(num_frames):
    """The same HF BLIP-2 weights as an image model and as a clip model of num_frames frames."""
    hf, tok = tiny.hf_blip2("opt")
    return (blip2_stage2_from_hf(hf, tokenizer=tok).eval(),
            blip2_stage2_from_hf(hf, tokenizer=tok, num_frames=num_frames).eval())


# ---------------------------------------------------------------- the model


def test_one_frame_clips_are_images_and_image_weights_load_into_clip_models(bert):
    """T = 1: the same losses, query outputs and generations as the image path; an image checkpoint (here the HF
    one) loaded into a 4-frame model computes what the image model computes on single frames, since its frame
    embedding starts at zero."""
    image_model, clip_model = stage2_pair(num_frames=4)
    assert clip_model.frame_embed.shape == (4, 64) and not clip_model.frame_embed.any()
    x = clips(T=1)
    close(clip_model.query_outputs(x), image_model.query_outputs(x[:, 0]))
    close(clip_model(x, CAPTIONS)["loss"], image_model(x[:, 0], CAPTIONS)["loss"])
    assert clip_model.generate(x, num_beams=2, max_new_tokens=4) == image_model.generate(x[:, 0], num_beams=2,
                                                                                      max_new_tokens=4)
    torch.manual_seed(0)
    stage1_clip = Blip2Stage1(tiny.our_config(bert, num_frames=1)).eval()
    losses = stage1_clip(x, CAPTIONS, neg_generator=torch.Generator().manual_seed(0))
    again = stage1_clip(x[:, 0], CAPTIONS, neg_generator=torch.Generator().manual_seed(0))
    for k in ("itc", "itm", "itg"):
        close(losses[k], again[k])
    # a clip of T frames gives 32 (here 8) query outputs, like an image
    assert clip_model.query_outputs(clips(T=4)).shape == image_model.query_outputs(x[:, 0]).shape


def test_frame_order_matters_once_the_frame_embedding_has_learned(bert):
    _, model = stage2_pair(num_frames=3)
    x = clips(T=3)
    shuffled = x[:, [2, 0, 1]]
    close(model.query_outputs(x), model.query_outputs(shuffled), 1e-5)  # zero frame embedding: a set of frames
    with torch.no_grad():
        model.frame_embed.normal_(std=1.0)
    assert (model.query_outputs(x) - model.query_outputs(shuffled)).abs().max() > 1e-3


def test_padded_frames_and_feature_segments_change_nothing(bert):
    _, model = stage2_pair(num_frames=4)
    with torch.no_grad():
        model.frame_embed.normal_(std=1.0)
    x = clips(T=2)
    padded = torch.cat([x, torch.randn(2, 2, 3, tiny.IMAGE, tiny.IMAGE)], 1)  # 2 real frames + 2 of garbage
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    close(model.query_outputs(padded, mask), model.query_outputs(x, torch.ones(2, 2, dtype=torch.long)), 1e-5)
    assert (model.query_outputs(padded) - model.query_outputs(x)).abs().max() > 1e-3  # unmasked, they count
    # pre-extracted clip features (B x S x F) with a padding mask
    torch.manual_seed(0)
    feats = Blip2Stage1(tiny.our_config(bert, feature_dim=12, num_frames=5)).eval()
    assert not hasattr(feats.visual, "vit") and feats.visual.proj.in_features == 12
    f = torch.randn(2, 3, 12)
    f_padded = torch.cat([f, torch.randn(2, 2, 12)], 1)
    f_mask = torch.tensor([[1, 1, 1, 0, 0]] * 2)
    close(feats.query_outputs(f_padded, f_mask), feats.query_outputs(f), 1e-5)
    losses = feats(f_padded, CAPTIONS, frame_mask=f_mask, neg_generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses.values())


def test_per_frame_generation_for_image_models():
    """InstructBLIP's way to read a clip with an image model: the Q-Former on each frame, T*Q soft prompts."""
    image_model, _ = stage2_pair(num_frames=1)
    x = clips(T=3)
    seen = []
    original = image_model.llm.generate_tokens
    image_model.llm.generate_tokens = lambda soft, *a, **k: (seen.append((soft.shape, k.get("prompt_mask"))),
                                                             original(soft, *a, **k))[1]
    out = image_model.generate(x, per_frame=True, frame_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), num_beams=1,
                               max_new_tokens=3)
    assert len(out) == 2 and seen[0][0] == (2, 3 * 8, 64)
    assert seen[0][1].tolist() == [[1] * 16 + [0] * 8, [1] * 24]


def test_stage1_alignment_only_is_the_video_recipe(bert, tmp_path):
    """stage1_losses=() with a P-Former: stage 1 trains only the alignment, with align_prefix before each caption."""
    from model import PFormer

    torch.manual_seed(0)
    pformer = PFormer(tiny.our_config(bert), llm_dim=16)
    model = Blip2Stage1(tiny.our_config(bert, stage1_losses=(), align_weight=100.0, align_prefix="a photo of "),
                        pformer=pformer)
    out = model(clips(T=1)[:, 0], CAPTIONS)
    assert set(out) == {"loss", "align"} and out["loss"].item() == pytest.approx(100 * out["align"].item())
    target = model.pformer.target(["a photo of " + c for c in CAPTIONS], "cpu")
    close(out["align"], torch.nn.functional.mse_loss(model.llm_proj(model.query_outputs(clips(T=1)[:, 0])), target))
    with pytest.raises(ValueError, match="nothing to train"):
        Blip2Stage1(tiny.our_config(bert, stage1_losses=()))(clips(T=1)[:, 0], CAPTIONS)


@pytest.mark.parametrize("losses", [(), ("itc",), ("itg",), ("itc", "itm"), ("itc", "itm", "itg")])
def test_every_trainable_weight_of_a_loss_subset_gets_a_gradient(bert, losses):
    """What DDP needs (it waits for a gradient of every trainable weight): the weights a subset of the stage-1
    losses never reaches are frozen, and every other one gets a gradient."""
    from model import PFormer

    torch.manual_seed(0)
    pformer = PFormer(tiny.our_config(bert), llm_dim=16) if not losses else None
    model = Blip2Stage1(tiny.our_config(bert, stage1_losses=losses), pformer=pformer)
    model(clips(T=1)[:, 0], CAPTIONS)["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, p in model.named_parameters() if p.grad is not None}
    assert ("itg_head.bias" in trainable) == ("itg" in losses)
    assert ("temp" in trainable) == bool({"itc", "itm"} & set(losses))


# ---------------------------------------------------------------- decoding and the datasets


def painted_video(path, n, size=16):
    """An mp4 whose frame i is painted with the value 20 * i: a decoded frame tells which frame it was."""
    write_video(str(path), [Image.new("RGB", (size, size), (20 * i,) * 3) for i in range(n)])
    return str(path)


def frame_numbers(frames):
    return [round(np.asarray(f).mean() / 20) for f in frames]


def test_decoding_returns_exactly_the_sampled_frames(tmp_path):
    video = painted_video(tmp_path / "ten.mp4", 10)
    assert sample_frame_indices(10, 4, "uniform") == [0, 2, 5, 7]  # np.arange(0, 10, 2.5)
    assert frame_numbers(decode_frames(video, 4, "uniform")) == [0, 2, 5, 7]
    for seed in range(5):
        want = sample_frame_indices(10, 4, "headtail", random.Random(seed))
        assert len(want) == 4 and want == sorted(want) and sum(i < 5 for i in want) == 2  # two from each half
        assert frame_numbers(decode_frames(video, 4, "headtail", random.Random(seed))) == want
    # a clip shorter than T: all its frames, padded with the last one and masked
    short = decode_frames(painted_video(tmp_path / "three.mp4", 3), 5, "uniform")
    assert frame_numbers(short) == [0, 1, 2]
    item = pad_clip(torch.stack([torch.full((3, 4, 4), float(i)) for i in range(3)]), 5)
    assert item["frame_mask"].tolist() == [1, 1, 1, 0, 0] and item["image"][:, 0, 0, 0].tolist() == [0, 1, 2, 2, 2]


def marked_video(path, rotation, n=3):
    """An mp4 of n landscape frames (32 x 16) with a white top-left corner, stored with a display rotation (degrees
    counter-clockwise, as FFmpeg and PyAV count it), as a phone stores a portrait clip."""
    import av

    frame = np.zeros((16, 32, 3), np.uint8)
    frame[:8, :8] = 255
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        if hasattr(stream, "set_display_rotation"):  # PyAV 18; test_frames_are_turned_... skips without it
            stream.set_display_rotation(rotation)
        for _ in range(n):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def test_frames_are_turned_as_the_display_rotation_says(tmp_path):
    import av

    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display rotation")

    def white_corners(frame):  # top-left, top-right, bottom-left, bottom-right
        a = np.asarray(frame).mean(2) > 128
        return [bool(a[:4, :4].all()), bool(a[:4, -4:].all()), bool(a[-4:, :4].all()), bool(a[-4:, -4:].all())]

    # a phone's "rotate 90" (90 clockwise, -90 counted counter-clockwise): the top-left corner ends top-right
    for rotation, size, corners in [(0, (32, 16), [1, 0, 0, 0]), (-90, (16, 32), [0, 1, 0, 0]),
                                    (90, (16, 32), [0, 0, 1, 0]), (180, (32, 16), [0, 0, 0, 1])]:
        frames = decode_frames(marked_video(tmp_path / f"r{rotation}.mp4", rotation), 2)
        assert [(f.size, white_corners(f)) for f in frames] == [(size, [bool(c) for c in corners])] * 2, rotation


def write_ann(path, entries):
    path.write_text(json.dumps(entries))
    return str(path)


def test_video_datasets_and_bad_videos(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    painted_video(root / "good.mp4", 8)
    painted_video(root / "other.mp4", 8)
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("not a video")
    (root / "cut.mp4").write_bytes((root / "good.mp4").read_bytes()[:300])
    names = ["good", "missing", "empty", "text", "cut", "other"]
    ann = write_ann(tmp_path / "ann.json", [{"video": f"{n}.mp4", "caption": n} for n in names])
    ds = VideoTextDataset(ann, str(root), image_size=16, num_frames=4, augment=False)
    item = ds[0]
    assert item["image"].shape == (4, 3, 16, 16) and item["frame_mask"].tolist() == [1, 1, 1, 1]
    with pytest.warns(UserWarning) as record:
        replaced = ds[1]
    assert replaced["text"] == "other" and replaced["skipped"] == 4
    assert all(n in " ".join(str(w.message) for w in record) for n in ("missing.mp4", "empty.mp4", "text.mp4",
                                                                         "cut.mp4"))
    strict = VideoTextDataset(ann, str(root), image_size=16, num_frames=4, augment=False, strict=True)
    for i in (1, 2, 3, 4):
        with pytest.raises(RuntimeError, match=f"{names[i]}.mp4"):
            strict[i]
    # WebVid's entries: {"videoid", "name"}
    webvid = write_ann(tmp_path / "webvid.json", [{"videoid": "good", "name": "a grey clip"}])
    assert VideoTextDataset(webvid, str(root), 16, 2, augment=True)[0]["text"] == "a grey clip"
    # training: one crop and one flip for all the frames of a clip
    train = VideoTextDataset(ann, str(root), image_size=16, num_frames=4, augment=True)
    clip = train[0]["image"]
    assert clip.shape == (4, 3, 16, 16)
    # clip features: root/name.npy, cut or padded to num_frames segments with a mask
    np.save(root / "good.npy", np.ones((3, 7), dtype=np.float32))
    feats = ClipFeatureDataset(write_ann(tmp_path / "f.json", [{"video": "good.mp4", "caption": "x"}]), str(root), 5)
    item = feats[0]
    assert item["image"].shape == (5, 7) and item["frame_mask"].tolist() == [1, 1, 1, 0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="consecutive unreadable feature files"):
            ClipFeatureDataset(write_ann(tmp_path / "g.json", [{"video": "none.mp4", "caption": "x"}]), str(root),
                               5)[0]


def test_clips_in_tar_shards(tmp_path):
    """webdataset shards of key.mp4 + key.txt, as WebVid is often packed: clips decoded from the bytes in the tar; a
    clip that is not a video is skipped and counted on the next one."""
    import io
    import tarfile

    from data import TarShardDataset
    from video import ClipTransform

    good = open(painted_video(tmp_path / "a.mp4", 8), "rb").read()
    shard = tmp_path / "clips.tar"
    with tarfile.open(shard, "w") as tar:
        for key, data in (("a", good), ("b", b"not a video"), ("c", good)):
            for name, payload in ((f"{key}.mp4", data), (f"{key}.txt", f"clip {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    ds = TarShardDataset([shard], ClipTransform(16, False), num_frames=4, sampling="uniform", shuffle_buffer=0)
    with pytest.warns(UserWarning, match="clips.tar:b"):
        items = list(ds)
    assert [(it["text"], it["skipped"]) for it in items] == [("clip a", 0), ("clip c", 1)]
    assert items[0]["image"].shape == (4, 3, 16, 16) and items[0]["frame_mask"].tolist() == [1, 1, 1, 1]


def stage2_checkpoint(world, path, **changes):
    """An untrained stage-2 checkpoint of config/stage2_tiny.py (with stage 1's sizes) on the tiny world, with
    config changes."""
    import train_common as tc
    from model import Blip2Config

    ns = {}
    for name in ("stage1_tiny.py", "stage2_tiny.py"):
        exec(open(f"config/{name}").read(), ns)
    config = {k: (v.replace("data/world", world) if isinstance(v, str) else v) for k, v in ns.items()
              if not k.startswith("_")}
    config.update(changes)
    torch.manual_seed(0)
    model = Blip2Stage2(Blip2Config.pick(config))
    tc.save_checkpoint(str(path), {"stage": 2, "model": tc.trainable_state_dict(model), "config": config})
    return str(path)


def eval_config(**changes):
    import eval as E

    return dict(E.DEFAULTS, device="cpu", dtype="float32", num_workers=0, log_every=0.0, num_beams=1,
                max_new_tokens=4, min_new_tokens=1, caption_scorers=["BLEU", "CIDEr"], **changes)


def test_eval_on_clips(tiny_world, tmp_path):
    """eval.py's video tasks on a clip checkpoint (captions: LAVIS's per-caption entries grouped by video; QA:
    MSRVTT-QA's format), and an image checkpoint read per frame (InstructBLIP's way)."""
    import eval as E

    for frames in (4, 1):
        stage2_checkpoint(tiny_world, tmp_path / f"ckpt{frames}.pt", num_frames=frames)
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a", "b"):
        painted_video(videos / f"{name}.mp4", 6, size=32)
    caps = write_ann(tmp_path / "caps.json", [{"video": "a.mp4", "caption": "a grey clip"},
                                              {"video": "a.mp4", "caption": "grey frames"},
                                              {"video": "b.mp4", "caption": "another clip"}])
    qa = write_ann(tmp_path / "qa.json", [{"video": "a.mp4", "question": "what color?", "answer": "grey",
                                           "question_id": 1},
                                          {"video": "b.mp4", "question": "how many?", "answer": "one",
                                           "question_id": 2}])
    cfg = eval_config(image_root=str(videos))
    metrics = E.run({**cfg, "task": "video_caption", "ckpt": str(tmp_path / "ckpt4.pt"), "ann_file": caps,
                     "out_dir": str(tmp_path / "cap")})
    assert metrics["scored"] == 2 and "CIDEr" in metrics  # two videos, a.mp4 with two references
    metrics = E.run({**cfg, "task": "video_qa", "ckpt": str(tmp_path / "ckpt4.pt"), "ann_file": qa,
                     "out_dir": str(tmp_path / "qa")})
    assert metrics["scored"] == 2 and 0 <= metrics["overall"] <= 100
    metrics = E.run({**cfg, "task": "video_qa", "ckpt": str(tmp_path / "ckpt1.pt"), "ann_file": qa, "num_frames": 3,
                     "per_frame": True, "out_dir": str(tmp_path / "per_frame")})
    assert metrics["scored"] == 2


def test_eval_on_real_video_files(tiny_world, tmp_path):
    """A caption file over real files: a phone clip stored sideways is read upright, a corrupt mp4 is skipped with a
    warning naming it and counted (strict_images stops, and the captions generated before it stay in the progress
    file), results carry LAVIS's image_id; a missing video and too many frames are one-line errors at start."""
    import eval as E

    ckpt = stage2_checkpoint(tiny_world, tmp_path / "ckpt.pt", num_frames=4)
    videos = tmp_path / "videos"
    videos.mkdir()
    painted_video(videos / "good.mp4", 6, size=32)
    rotated = marked_video(videos / "phone.mp4", -90, n=6)
    (videos / "corrupt.mp4").write_bytes(open(rotated, "rb").read()[:200])
    names = {"7010": "good", "7011": "phone", "7012": "corrupt"}
    caps = write_ann(tmp_path / "caps.json", [{"video": f"{name}.mp4", "caption": f"a {name} clip", "image_id": i}
                                              for i, name in names.items()])
    cfg = eval_config(task="msrvtt_caption", ckpt=ckpt, ann_file=caps, image_root=str(videos), batch_size=1,
                      out_dir=str(tmp_path / "out"))
    with pytest.warns(UserWarning, match=r"cannot read .*corrupt\.mp4"):
        metrics = E.run(cfg)
    assert metrics["skipped_unreadable"] == 1 and metrics["scored"] == 2 and metrics["missing"] == 1
    out = tmp_path / "out"
    results = json.loads((out / "msrvtt_caption_captions.json").read_text())
    assert [r["image_id"] for r in results] == [7010, 7011]  # LAVIS: the annotation's id, an int when it is one
    assert sorted(os.listdir(out)) == ["msrvtt_caption_captions.json", "msrvtt_caption_metrics.json"]
    with pytest.raises(RuntimeError, match=r"cannot read .*corrupt\.mp4"):
        E.run({**cfg, "strict_images": True})
    kept = [json.loads(line) for line in open(out / "msrvtt_caption_progress.rank0.jsonl")]
    assert [k["image_id"] for k in kept] == [7010, 7011] and all(isinstance(k["text"], str) for k in kept)
    qa = write_ann(tmp_path / "qa.json", [{"video": "gone.mp4", "question": "what?", "answer": "x", "question_id": 3}])
    with pytest.raises(FileNotFoundError, match=r"video file not found for question 3: .*gone\.mp4 \(1 of 1 questions"):
        E.run({**cfg, "task": "msrvtt_qa", "ann_file": qa})
    with pytest.raises(ValueError, match="num_frames=8, but the model reads at most 4 frames per clip"):
        E.run({**cfg, "num_frames": 8})


def test_eval_on_a_folder_of_clip_features(tiny_world, tmp_path):
    """A clip-feature model reads name.npy for the annotations' name.mp4: no video file needs to exist, and a
    missing feature file is named as one."""
    import eval as E

    ckpt = stage2_checkpoint(tiny_world, tmp_path / "ckpt.pt", num_frames=4, feature_dim=12)
    features = tmp_path / "features"
    features.mkdir()
    rng = np.random.default_rng(0)
    for name, segments in (("a", 3), ("b", 6)):
        np.save(features / f"{name}.npy", rng.standard_normal((segments, 12)).astype(np.float32))
    caps = write_ann(tmp_path / "caps.json", [{"video": "a.mp4", "caption": "a clip"},
                                              {"video": "b.mp4", "caption": "b clip"}])
    cfg = eval_config(task="vatex_caption", ckpt=ckpt, ann_file=caps, image_root=str(features),
                      out_dir=str(tmp_path / "out"))
    assert E.run(cfg)["scored"] == 2
    (features / "b.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"feature file not found for video 'b.mp4': .*b\.npy \(1 of 2"):
        E.run(cfg)

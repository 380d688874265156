"""Tests for data.py on tiny files generated in tmp_path (CPU only)."""

import io
import json
import random
import tarfile
import warnings
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler
from torchvision import transforms

from data import (
    CLIP_MEAN, CLIP_STD, MAX_CONSECUTIVE_UNREADABLE, ImageTextDataset, ResumableDistributedSampler,
    TarShardDataset, TextDataset, build_loader, clean_caption, collate, eval_transform, load_annotations,
    seed_worker, train_transform,
)


def fields(item, *keys):
    """A sample dict's values as a tuple, e.g. fields(item, "text", "skipped")."""
    return tuple(item[k] for k in keys)


def save_image(path, color, size=(20, 14), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def image_bytes(color, fmt="JPEG"):
    buf = io.BytesIO()
    Image.new("RGB", (20, 14), color).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, members):
    """members: list of (name, bytes), written in order; a name ending in / is a directory."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def mean_rgb(t):
    """Undo the CLIP normalisation and return the mean colour in 0..255."""
    t = t * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
    return (t.mean(dim=(1, 2)) * 255).tolist()

# -----------------------------------------------------------------------------
# captions and transforms


def test_clean_caption():
    assert clean_caption('A Dog. Running!  "Fast" (very)*#:;~ now\n') == "a dog running fast very now"
    assert clean_caption("  Hello,\tWORLD's   cat-toy ?\n\n") == "hello, world's cat-toy ?"
    assert clean_caption("...!!!") == ""
    long = " ".join(f"w{i}" for i in range(60))
    assert clean_caption(long).split() == [f"w{i}" for i in range(50)]
    assert clean_caption(long, max_words=3) == "w0 w1 w2"


def test_transforms():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    for build in (train_transform, eval_transform):
        for mode in ("RGB", "L", "RGBA", "P"):
            img = Image.new(mode, (40, 30))
            assert build(32)(img).shape == (3, 32, 32)
        norm = [t for t in build().transforms if isinstance(t, transforms.Normalize)][0]
        assert tuple(norm.mean) == CLIP_MEAN and tuple(norm.std) == CLIP_STD
    crop = train_transform(224).transforms[1]
    assert isinstance(crop, transforms.RandomResizedCrop)
    assert crop.size == (224, 224) and crop.scale == (0.5, 1.0)
    assert crop.interpolation == transforms.InterpolationMode.BICUBIC
    resize = eval_transform(224).transforms[1]
    assert resize.size == (224, 224) and resize.interpolation == transforms.InterpolationMode.BICUBIC
    # a flat colour survives resize + normalisation exactly
    out = eval_transform(16)(Image.new("RGB", (40, 30), (200, 100, 50)))
    expected = [(c / 255 - m) / s for c, m, s in zip((200, 100, 50), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(out, torch.tensor(expected)[:, None, None].expand(3, 16, 16), atol=1e-5)

# -----------------------------------------------------------------------------
# annotation files and map-style datasets


def test_annotations_and_concatenated_datasets(tmp_path):
    save_image(tmp_path / "root1" / "a.jpg", (255, 0, 0))
    save_image(tmp_path / "root2" / "sub" / "b.png", (0, 0, 255))
    ann1 = tmp_path / "ann1.json"
    ann1.write_text(json.dumps([{"image": "a.jpg", "caption": ["A Red one.", "Second: caption!"], "image_id": 1}]))
    ann2 = tmp_path / "ann2.jsonl"
    ann2.write_text(json.dumps({"image": "sub/b.png", "caption": "Blue (image)"}) + "\n\n")

    assert load_annotations(ann1)[0]["caption"] == ["A Red one.", "Second: caption!"]
    assert load_annotations(ann2) == [{"image": "sub/b.png", "caption": "Blue (image)"}]

    ds = ImageTextDataset([ann1, ann2], [tmp_path / "root1", tmp_path / "root2"], eval_transform(16))
    assert len(ds) == 3
    items = [ds[i] for i in range(3)]
    assert [it["text"] for it in items] == ["a red one", "second caption", "blue image"]
    assert all(it["image"].shape == (3, 16, 16) and it["skipped"] == 0 for it in items)
    # the two captions of a.jpg share its image id, b.png has another: stage 1's same-image positives
    assert items[0]["image_id"] == items[1]["image_id"] != items[2]["image_id"]
    r, g, b = mean_rgb(items[0]["image"])
    assert r > 200 and b < 50  # from root1
    r, g, b = mean_rgb(items[2]["image"])
    assert b > 200 and r < 50  # from root2

    single = ImageTextDataset(str(ann2), str(tmp_path / "root2"), eval_transform(16))
    assert len(single) == 1
    with pytest.raises(ValueError, match="2 annotation files but 1 roots"):
        ImageTextDataset([ann1, ann2], [tmp_path / "root1"], eval_transform(16))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageTextDataset(ann1, tmp_path / "nowhere", eval_transform(16))


@pytest.mark.parametrize("name, content, where", [
    ("bad.json", '[{"image": "a.jpg", "caption": "x"},', "not valid JSON"),
    ("dict.json", '{"image": "a.jpg", "caption": "x"}', "expected a JSON list"),
    ("nocap.json", '[{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}]', "entry 1"),
    ("noimage.json", '[{"image": "a.jpg", "caption": "x"}, {"caption": "y"}]', "entry 1"),
    ("empty.json", '[{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "caption": []}]', "entry 1"),
    ("number.json", '[{"image": "a.jpg", "caption": 3}]', "entry 0"),
    ("listnum.json", '[{"image": "a.jpg", "caption": ["ok", null]}]', "entry 0"),
    ("bad.jsonl", '{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", "caption": \n', "line 2"),
    ("nocap.jsonl", '{"image": "a.jpg", "caption": "x"}\n\n{"image": "b.jpg"}\n', "line 3"),
])
def test_malformed_annotations(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        load_annotations(path)
    assert str(path) in str(e.value) and where in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_annotations(tmp_path / "missing.json")


def test_unreadable_images_are_replaced_and_counted(tmp_path):
    root = tmp_path / "img"
    save_image(root / "ok.jpg", (0, 255, 0))
    save_image(root / "ok2.png", (0, 0, 255))
    (root / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    (root / "truncated.jpg").write_bytes(image_bytes((1, 2, 3))[:100])
    ann = tmp_path / "ann.json"
    names = ["ok.jpg", "missing.jpg", "corrupt.jpg", "ok2.png", "truncated.jpg"]
    ann.write_text(json.dumps([{"image": n, "caption": n} for n in names]))

    ds = ImageTextDataset(ann, root, eval_transform(16))
    assert fields(ds[0], "text", "skipped") == ("ok jpg", 0)
    # missing.jpg and corrupt.jpg are replaced by the next readable sample, ok2.png
    with pytest.warns(UserWarning) as record:
        img, text, skipped, image_id = fields(ds[1], "image", "text", "skipped", "image_id")
    assert text == "ok2 png" and skipped == 2 and img.shape == (3, 16, 16)
    assert image_id == ds[3]["image_id"]  # the replacement's image and id go with its caption
    assert len(record) == 2 and "missing.jpg" in str(record[0].message) and "corrupt.jpg" in str(record[1].message)
    assert all("\n" not in str(w.message) for w in record)
    # the last sample wraps around to the first
    with pytest.warns(UserWarning, match="truncated.jpg"):
        assert fields(ds[4], "text", "skipped") == ("ok jpg", 1)
    # one warning per file: known bad files are passed over silently (and still counted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fields(ds[2], "text", "skipped") == ("ok2 png", 1)
        assert fields(ds[-1], "text", "skipped") == ("ok jpg", 1)
    with pytest.raises(IndexError):
        ds[5]

    # batches keep their size; collate reports the skips
    fresh = ImageTextDataset(ann, root, eval_transform(16))
    with pytest.warns(UserWarning):
        loader, sampler = build_loader(fresh, batch_size=5, num_workers=0, shuffle=False, drop_last=False)
        batches = list(loader)
    assert len(batches) == 1 and isinstance(sampler, ResumableDistributedSampler)
    assert batches[0]["image"].shape == (5, 3, 16, 16)
    assert batches[0]["text"] == ["ok jpg", "ok2 png", "ok2 png", "ok2 png", "ok jpg"]
    assert batches[0]["skipped"] == 2 + 1 + 0 + 1
    r, g, b = mean_rgb(batches[0]["image"][1])
    assert b > 200 and g < 50  # the replacement's image goes with its caption

    strict = ImageTextDataset(ann, root, eval_transform(16), strict=True)
    for i in (1, 2, 4):
        with pytest.raises(RuntimeError, match=names[i]):
            strict[i]
    assert fields(strict[3], "text", "skipped") == ("ok2 png", 0)


def test_too_many_consecutive_unreadable_images(tmp_path):
    root = tmp_path / "img"
    save_image(root / "ok.jpg", (0, 255, 0))
    n_bad = MAX_CONSECUTIVE_UNREADABLE
    assert n_bad == 100
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": f"gone{i:03d}.jpg", "caption": "x"} for i in range(n_bad)]
                              + [{"image": "ok.jpg", "caption": "ok"}]))
    ds = ImageTextDataset(ann, root, eval_transform(16))
    with pytest.warns(UserWarning):
        with pytest.raises(RuntimeError, match="100 consecutive unreadable.*gone000.jpg.*check the root"):
            ds[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all 100 were warned about already
        assert fields(ds[1], "text", "skipped") == ("ok", 99)  # 99 bad in a row are still passed over

    # every image missing in a small dataset (the wrong root): one pass over it, then the error
    small = tmp_path / "small.json"
    small.write_text(json.dumps([{"image": f"gone{i}.jpg", "caption": "x"} for i in range(3)]))
    wrong = ImageTextDataset(small, tmp_path, eval_transform(16))
    with pytest.warns(UserWarning):
        with pytest.raises(RuntimeError, match=f"3 consecutive unreadable.*gone1.jpg.*{tmp_path}"):
            wrong[1]


def test_text_dataset(tmp_path):
    txt = tmp_path / "sentences.txt"
    txt.write_text("First Sentence.\n\n   \nsecond (one)\n")
    ann = tmp_path / "caps.json"
    ann.write_text(json.dumps([{"image": "a.jpg", "caption": ["Cap A", "Cap B"]}, {"caption": "No image!"}]))
    ds = TextDataset([txt, ann])
    assert [fields(ds[i], "text", "skipped") for i in range(len(ds))] == [
        ("first sentence", 0), ("second one", 0), ("cap a", 0), ("cap b", 0), ("no image", 0)]
    assert collate([ds[0], ds[1]]) == {"text": ["first sentence", "second one"], "skipped": 0}
    # text items of a TarShardDataset collate the same way
    assert collate([ds[0], {"text": "after bad", "skipped": 2}]) == {"text": ["first sentence", "after bad"],
                                                                     "skipped": 2}
    with pytest.raises(ValueError, match="unknown text file type"):
        TextDataset(tmp_path / "x.csv")

# -----------------------------------------------------------------------------
# tar shards


def make_shards(tmp_path, n_shards=4, per_shard=3):
    """Shards with jpg+txt and png+json samples, a caption-less image, an image-less caption and a directory
    entry. Returns the brace pattern and the captions an image-text reader must see."""
    expected = []
    for s in range(n_shards):
        members = [("0000/", b"")]
        for i in range(per_shard):
            key = f"0000/{s:02d}{i:03d}"
            caption = f"Shard {s} sample {i}."
            if i % 2 == 0:
                members += [(f"{key}.jpg", image_bytes((10 * i, 0, 0))), (f"{key}.txt", caption.encode())]
            else:
                members += [(f"{key}.json", json.dumps({"caption": caption, "url": "x"}).encode()),
                            (f"{key}.png", image_bytes((0, 10 * i, 0), "PNG"))]
            expected.append(clean_caption(caption))
        members += [(f"0000/{s:02d}900.jpg", image_bytes((0, 0, 0)))]  # no caption
        members += [(f"0000/{s:02d}901.txt", b"text only")]  # no image
        write_tar(tmp_path / f"shard-{s:05d}.tar", members)
    return str(tmp_path / f"shard-{{00000..{n_shards - 1:05d}}}.tar"), expected


def test_tar_shards_read_every_sample_once(tmp_path):
    pattern, expected = make_shards(tmp_path)
    ds = TarShardDataset(pattern, eval_transform(16), shuffle_buffer=4)
    assert len(ds.shards) == 4 and ds.shards[0].endswith("shard-00000.tar")
    items = list(ds)
    assert Counter(it["text"] for it in items) == Counter(expected)
    assert all(it["image"].shape == (3, 16, 16) and it["skipped"] == 0 for it in items)
    assert len({it["image_id"] for it in items}) == len(items)  # one image per sample in these shards
    # a glob pattern and an explicit list name the same shards
    assert TarShardDataset(str(tmp_path / "*.tar"), None).shards == ds.shards
    assert TarShardDataset(ds.shards, None).shards == ds.shards

    # transform=None: captions only, image-less samples included
    items = [fields(it, "text", "skipped") for it in TarShardDataset(pattern, None, shuffle_buffer=4)]
    assert all(isinstance(t, str) and skipped == 0 for t, skipped in items)
    assert Counter(t for t, _ in items) == Counter(expected + ["text only"] * 4)


def test_tar_shards_split_across_ranks_and_workers(tmp_path):
    pattern, expected = make_shards(tmp_path)
    seen = []
    for rank in range(2):
        ds = TarShardDataset(pattern, eval_transform(16), rank=rank, world_size=2, shuffle_buffer=2)
        ds.set_epoch(3)
        loader, sampler = build_loader(ds, batch_size=2, num_workers=2, drop_last=False)
        assert sampler is None
        seen += [t for batch in loader for t in batch["text"]]
    assert Counter(seen) == Counter(expected)  # every sample exactly once over 2 ranks x 2 workers

    with pytest.raises(ValueError, match="4 shards cannot feed 8 ranks"):
        list(TarShardDataset(pattern, None, rank=0, world_size=8))


def test_tar_shards_dealt_whole_to_one_rank_and_worker_per_epoch(tmp_path, monkeypatch):
    """2 ranks x 2 DataLoader workers, simulated in this process: each epoch every shard goes whole to exactly one
    (rank, worker) stream, two shards each, and the next epoch deals them anew."""
    import data

    pattern, _ = make_shards(tmp_path, n_shards=8, per_shard=2)
    deals = []
    for epoch in (0, 1):
        deal = {}
        for rank in range(2):
            for worker in range(2):
                info = SimpleNamespace(id=worker, num_workers=2)
                monkeypatch.setattr(data, "get_worker_info", lambda: info)  # ours, for the check and the seeds
                monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)  # webdataset's split
                ds = TarShardDataset(pattern, None, rank=rank, world_size=2, shuffle_buffer=3)
                ds.set_epoch(epoch)
                texts = [it["text"] for it in ds if it["text"] != "text only"]
                deal[rank, worker] = sorted({int(t.split()[1]) for t in texts})
                assert len(texts) == 2 * len(deal[rank, worker])  # both samples of each of its shards
        assert sorted(s for shards in deal.values() for s in shards) == list(range(8))
        assert all(len(shards) == 2 for shards in deal.values())
        deals.append(deal)
    assert deals[0] != deals[1]


def test_tar_shards_epoch_order_and_skip(tmp_path):
    pattern, _ = make_shards(tmp_path)
    ds = TarShardDataset(pattern, None, shuffle_buffer=3, seed=7)
    ds.set_epoch(1)
    epoch1 = [it["text"] for it in ds]
    assert [it["text"] for it in ds] == epoch1  # deterministic
    ds.set_epoch(2)
    epoch2 = [it["text"] for it in ds]
    assert epoch2 != epoch1 and sorted(epoch2) == sorted(epoch1)

    ds.set_epoch(1)
    ds.skip(5)
    assert [it["text"] for it in ds] == epoch1[5:]
    ds.set_epoch(2)
    assert [it["text"] for it in ds] == epoch2  # the skip belonged to epoch 1


def test_tar_shards_shuffle_buffer(tmp_path):
    shard = tmp_path / "one.tar"
    captions = [f"sample {i}" for i in range(12)]
    write_tar(shard, [(f"{i:03d}.txt", c.encode()) for i, c in enumerate(captions)])
    assert [it["text"] for it in TarShardDataset([shard], None, shuffle_buffer=0)] == captions  # tar order
    shuffled = [it["text"] for it in TarShardDataset([shard], None, shuffle_buffer=4)]
    assert shuffled != captions and sorted(shuffled) == sorted(captions)


def test_tar_shards_set_epoch_reaches_persistent_workers(tmp_path):
    pattern, _ = make_shards(tmp_path)

    def epoch(loader):
        return [t for batch in loader for t in batch["text"]]

    def fresh_loader(ds):
        return build_loader(ds, batch_size=2, num_workers=2, drop_last=False)[0]

    ds = TarShardDataset(pattern, None, shuffle_buffer=3)
    loader = fresh_loader(ds)
    epoch0 = epoch(loader)
    ds.set_epoch(1)
    epoch1 = epoch(loader)  # the same persistent workers
    ds.skip(2)
    epoch1_resumed = epoch(loader)

    reference = TarShardDataset(pattern, None, shuffle_buffer=3)
    reference.set_epoch(1)
    expected = epoch(fresh_loader(reference))
    assert epoch1 == expected and epoch1 != epoch0
    # each worker drops its first 2 samples, i.e. its first batch; batches alternate between the 2 workers
    assert epoch1_resumed == expected[4:]


def test_tar_shards_bad_samples(tmp_path):
    good = tmp_path / "good.tar"
    write_tar(good, [("a.jpg", image_bytes((5, 5, 5))), ("a.txt", b"fine"),
                     ("b.jpg", b"garbage"), ("b.txt", b"broken image"),
                     ("c.jpg", image_bytes((5, 5, 5))), ("c.json", b"{not json")])
    cut = tmp_path / "cut.tar"
    write_tar(cut, [("d.jpg", image_bytes((5, 5, 5))), ("d.txt", b"first"),
                    ("e.jpg", image_bytes((9, 9, 9)) * 20), ("e.txt", b"lost")])
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])  # ends inside e.jpg

    ds = TarShardDataset([good], eval_transform(16), shuffle_buffer=0)
    with pytest.warns(UserWarning) as record:
        items = list(ds)
    assert [fields(x, "text", "skipped") for x in items] == [("fine", 0)]  # trailing bad samples: nothing left to carry their count
    messages = " ".join(str(w.message) for w in record)
    assert "good.tar:b" in messages and "good.tar:c" in messages
    with pytest.raises(RuntimeError, match="good.tar:b"):
        list(TarShardDataset([good], eval_transform(16), strict=True, shuffle_buffer=0))

    # bad samples between good ones: full-size batches, the skip count on the next good sample
    mixed = tmp_path / "mixed.tar"
    members = []
    for i in range(6):
        bad = i in (1, 2, 4)
        members += [(f"{i}.jpg", b"garbage" if bad else image_bytes((5, 5, 5))), (f"{i}.txt", f"s{i}".encode())]
    members += [("6.jpg", image_bytes((5, 5, 5))), ("6.json", b"{not json")]  # bad caption
    members += [("7.jpg", image_bytes((5, 5, 5))), ("7.txt", b"s7")]
    write_tar(mixed, members)
    ds = TarShardDataset([mixed], eval_transform(16), shuffle_buffer=0)
    with pytest.warns(UserWarning) as record:
        items = list(ds)
    assert [fields(x, "text", "skipped") for x in items] == [("s0", 0), ("s3", 2), ("s5", 1), ("s7", 1)]
    assert all(f"mixed.tar:{k}" in " ".join(str(w.message) for w in record) for k in (1, 2, 4, 6))
    with pytest.warns(UserWarning):
        batches = list(build_loader(ds, batch_size=2, num_workers=0)[0])
    assert [b["image"].shape for b in batches] == [(2, 3, 16, 16)] * 2
    assert [b["text"] for b in batches] == [["s0", "s3"], ["s5", "s7"]]
    assert [b["skipped"] for b in batches] == [2, 2]
    # resume: skip(n) counts stream samples, bad ones included
    ds.skip(3)  # 0, 1, 2 consumed
    with pytest.warns(UserWarning):
        assert [fields(x, "text", "skipped") for x in ds] == [("s3", 0), ("s5", 1), ("s7", 1)]

    # text only: an undecodable caption is skipped and counted too
    text_shard = tmp_path / "text.tar"
    write_tar(text_shard, [("a.txt", b"one"), ("b.txt", b"\xff\xfe bad utf-8"), ("c.json", b"{}"),
                           ("d.txt", b"two")])
    with pytest.warns(UserWarning) as record:
        items = list(TarShardDataset([text_shard], None, shuffle_buffer=0))
    assert ["text.tar:b" in str(w.message) for w in record] == [True, False]
    assert "text.tar:c" in str(record[1].message)
    assert [fields(x, "text", "skipped") for x in items] == [("one", 0), ("two", 2)]
    assert collate(items) == {"text": ["one", "two"], "skipped": 2}

    with pytest.warns(UserWarning, match="cut.tar"):
        items = list(TarShardDataset([cut], eval_transform(16), shuffle_buffer=0))
    assert [fields(x, "text", "skipped") for x in items] == [("first", 0)]
    with pytest.raises(RuntimeError, match="cut.tar"):
        list(TarShardDataset([cut], eval_transform(16), strict=True))
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        TarShardDataset([good, tmp_path / "nope.tar"], None)

# -----------------------------------------------------------------------------
# sampler and loader


def test_sampler_partitions_and_matches_torch():
    data = list(range(11))
    for drop_last in (True, False):
        parts = [list(ResumableDistributedSampler(data, num_replicas=2, rank=r, seed=3, drop_last=drop_last))
                 for r in range(2)]
        torch_parts = [list(DistributedSampler(data, num_replicas=2, rank=r, seed=3, drop_last=drop_last))
                       for r in range(2)]
        assert parts == torch_parts
        if drop_last:
            assert len(parts[0]) == len(parts[1]) == 5 and len(set(parts[0]) | set(parts[1])) == 10
        else:
            assert len(parts[0]) == len(parts[1]) == 6 and set(parts[0]) | set(parts[1]) == set(data)
    single = list(ResumableDistributedSampler(data, shuffle=False))
    assert single == data


def test_sampler_epochs_and_resume():
    data = list(range(20))
    s = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=0)
    s.set_epoch(1)
    epoch1 = list(s)
    again = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=0)
    again.set_epoch(1)
    assert list(again) == epoch1
    s.set_epoch(2)
    assert list(s) != epoch1

    s.set_epoch(1)
    s.set_start(7)
    assert len(s) == 3
    assert list(s) == epoch1[7:]
    assert len(s) == 10 and list(s) == epoch1  # the start applied to one epoch only
    with pytest.raises(ValueError, match="outside"):
        s.set_start(11)


class RandomNumbers(Dataset):
    def __len__(self):
        return 8

    source = "random numbers"

    def __getitem__(self, i):
        return {"x": float(np.random.rand())}


def test_build_loader_seeds_workers():
    def draw(seed):
        loader, _ = build_loader(RandomNumbers(), batch_size=2, num_workers=2, seed=seed)
        return [x for batch in loader for x in batch["x"]]

    a, b, c = draw(0), draw(0), draw(1)
    assert a == b and a != c
    assert len(set(a)) == len(a)  # the two workers do not repeat each other


def test_seed_worker():
    torch.manual_seed(5)
    seed_worker(0)
    first = (np.random.rand(), random.random())
    torch.manual_seed(5)
    seed_worker(0)
    assert (np.random.rand(), random.random()) == first
    torch.manual_seed(6)
    seed_worker(0)
    assert (np.random.rand(), random.random()) != first


def test_frozen_feature_dataset_encodes_each_image_once(tmp_path):
    """Cached encoder features: each readable image encoded once, samples sharing an image share its row, and
    unreadable images are replaced exactly as ImageTextDataset replaces them (caption, image and count)."""
    from data import FrozenFeatureDataset, image_text_loader

    root = tmp_path / "img"
    save_image(root / "red.jpg", (255, 0, 0))
    save_image(root / "blue.png", (0, 0, 255))
    (root / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "red.jpg", "caption": ["red one", "red two"]},
                               {"image": "missing.jpg", "caption": "missing"},
                               {"image": "corrupt.jpg", "caption": "corrupt"},
                               {"image": "blue.png", "caption": "blue"}]))
    encoded = []

    def encode(images):  # B x 3 x H x W -> B x 2 x 3 "tokens": the mean colour, twice
        encoded.append(len(images))
        return images.mean(dim=(2, 3))[:, None].expand(-1, 2, -1) + 0

    plain = ImageTextDataset(ann, root, eval_transform(16))
    with pytest.warns(UserWarning):
        cached = FrozenFeatureDataset(ImageTextDataset(ann, root, eval_transform(16)), encode, batch_size=1)
        expected = [plain[i] for i in range(len(plain))]
    assert encoded == [1, 1]  # red.jpg and blue.png, once each
    assert len(cached) == len(plain) == 5
    for i, item in enumerate(expected):
        assert fields(cached[i], "text", "skipped", "image_id") == fields(item, "text", "skipped", "image_id")
        assert torch.allclose(cached[i]["image"], encode(item["image"][None])[0])
    assert cached[0]["image"].data_ptr() == cached[1]["image"].data_ptr()  # one row for both captions of red.jpg

    with pytest.raises(ValueError, match="not shards"):
        image_text_loader([], [], str(tmp_path / "x.tar"), eval_transform(16), 2, 0, encode=encode)

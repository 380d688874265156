"""
Data for BLIP-2 / P-Former training, in the formats of the real datasets: caption cleaning, image transforms,
LAVIS-style annotation files (JSON / JSONL) with their image folders, webdataset tar shards (as img2dataset writes
LAION), text-only corpora for P-Former stage 0, cached frozen-encoder features, a resumable distributed sampler and
the loaders. Every sample is a dict: {"image", "text", "image_id", "skipped"} ("text" and "skipped" only, for text).

Two rules hold everywhere: an unreadable sample never shrinks a batch (ITC and ITM gather equal batches across ranks),
it is replaced, warned about in one line naming the file, and counted in "skipped" (or, with strict, stops the run);
and each sample's random augmentation is seeded from the run's seed, the epoch and the sample's position, so that a
resumed run draws exactly what an uninterrupted one would, with any number of DataLoader workers.
"""

import bisect
import glob
import hashlib
import io
import json
import os
import random
import re
import signal
import warnings
from functools import partial

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from timm.data import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD

from distributed import rank_and_world_size
from video import VIDEO_EXTENSIONS, ClipTransform, decode_frames, pad_clip

# -----------------------------------------------------------------------------
# captions, images, seeds

_PUNCTUATION = re.compile(r'[.!"()*#:;~]')


def clean_caption(text, max_words=50):
    """BLIP's `blip_caption` cleaning: lowercase, punctuation .!"()*#:;~ -> space, one space between words,
    at most max_words words."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])




def _to_rgb(img):
    # a module-level function rather than a lambda, so the transform pickles into DataLoader workers
    return img if img.mode == "RGB" else img.convert("RGB")


def train_transform(image_size=224):
    """Training augmentation: random crop of 50-100% of the area, horizontal flip, CLIP normalisation."""
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def eval_transform(image_size=224):
    """Evaluation pre-processing: squash-resize to image_size x image_size, CLIP normalisation."""
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def seeded(transform, *key):
    """transform(x) with torch's random state seeded from `key` (run seed, epoch, sample position) and restored
    after: a sample's crop and flip depend on where it sits in the run, not on which worker drew it when."""
    def apply(x):
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone, which the transforms draw from: torch.manual_seed would also queue a seed
            # for every accelerator, at a cost of a stack trace per sample
            torch.default_generator.manual_seed(hash(key) % 2**63)
            return transform(x)
    return apply


def image_id_of(name):
    """A 63-bit integer id of an image (its path, or shard and key): samples with the same id show the same image
    (stage 1's same-image positives). A stable hash, the same on every rank and in every run."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


class BadSample(ValueError):
    """A file that reads but must not reach the model (features not finite, or of the wrong shape); its message
    names the file."""


def _cannot_read(name, err):
    """One line naming the file and the error (a BadSample's message names its file already)."""
    return str(err) if isinstance(err, BadSample) else \
        f"cannot read {name}: {type(err).__name__}: {' '.join(str(err).split())}"


def _unreadable(name, err, strict):
    """The skip/strict rule for a bad image, sample or shard: raise, or warn in one line (the caller then moves on
    to the next sample and counts the skip)."""
    msg = _cannot_read(name, err)
    if strict:
        raise RuntimeError(msg) from err
    warnings.warn("skipping: " + msg)


MAX_CONSECUTIVE_UNREADABLE = 100

# -----------------------------------------------------------------------------
# annotation files


def _check_entry(ann, path, where, media_key, text_key):
    if not isinstance(ann, dict):
        raise ValueError(f"{path} {where}: expected an object, got {type(ann).__name__}")
    if media_key and not (isinstance(ann.get(media_key), str) and ann[media_key]):
        raise ValueError(f"{path} {where}: missing or invalid \"{media_key}\" (a relative path string)")
    if text_key not in ann:
        raise ValueError(f"{path} {where}: missing \"{text_key}\"")
    caption = ann[text_key]
    if isinstance(caption, list):
        if not caption:
            raise ValueError(f"{path} {where}: empty {text_key} list")
        if not all(isinstance(c, str) for c in caption):
            raise ValueError(f"{path} {where}: {text_key} list holds a non-string")
    elif not isinstance(caption, str):
        raise ValueError(f"{path} {where}: {text_key} must be a string or a list of strings, "
                         f"got {type(caption).__name__}")


def load_annotations(path, media_key="image", text_key="caption"):
    """Read a LAVIS-style annotation file: a JSON list of {"image": ..., "caption": str or [str, ...]} objects, or
    JSONL (one object per line) when the name ends in .jsonl. media_key: "image", "video" (WebVid's {"videoid",
    "name"} entries read as {"video": "{videoid}.mp4", "caption": name}), or None (text only).
    Errors name the file and the entry (0-based list index for JSON, 1-based line number for JSONL)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.endswith(".jsonl"):
        entries = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
        entries = [(f"entry {i}", ann) for i, ann in enumerate(data)]
    if media_key == "video":  # WebVid's {"videoid", "name"}: the video is {videoid}.mp4, the caption its name
        for k, (where, a) in enumerate(entries):
            if isinstance(a, dict) and "videoid" in a and "video" not in a:
                if "name" not in a:
                    raise ValueError(f"{path} {where}: a WebVid entry (\"videoid\") without \"name\" (its caption)")
                entries[k] = (where, {"video": f"{a['videoid']}.mp4", "caption": a["name"]})
    for where, ann in entries:
        _check_entry(ann, path, where, media_key, text_key)
    return [ann for _, ann in entries]


def _as_list(x):
    return [os.fspath(x)] if isinstance(x, (str, os.PathLike)) else [os.fspath(p) for p in x]


def _captions(ann, key="caption"):
    return ann[key] if isinstance(ann[key], list) else [ann[key]]


class _StringArray:
    """A read-only list of strings packed into one numpy byte buffer plus offsets.
    Why: every access to a Python object in a forked DataLoader worker writes its refcount, which copies
    the memory page into that worker; millions of str objects would be duplicated per worker. Two numpy
    arrays have no per-item refcounts, so their pages stay shared."""

    def __init__(self, strings):
        encoded = [s.encode("utf-8") for s in strings]
        self.offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")

# -----------------------------------------------------------------------------
# map-style datasets


class EpochSeeded(Dataset):
    """A map-style dataset whose samples are augmented with seeds from (seed, epoch, index). The epoch sits in
    shared memory, so that set_epoch reaches persistent DataLoader workers, which keep their own copy of the
    dataset (the loader calls set_epoch before each epoch's iterator, so no worker reads it mid-change)."""

    def __init__(self, seed):
        self.seed = seed
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    def set_epoch(self, epoch):
        self._epoch[0] = epoch

    def augment(self, transform, i):
        return seeded(transform, self.seed, int(self._epoch[0]), i)


class ImageTextDataset(EpochSeeded):
    """Image-caption pairs from one or more annotation files, each with its own image root. An entry with a
    list of captions gives one sample per caption; all of them share the image's id.

    An unreadable (missing, corrupt, truncated) image never shrinks a batch, because ITC/ITM gather features
    across DDP ranks and need equal batch sizes: with strict=False, sample i is replaced by the next readable
    one (i+1, i+2, ... wrapping around), "skipped" counts the unreadable samples passed over (0 normally), and
    one warning per file names it. MAX_CONSECUTIVE_UNREADABLE bad samples in a row raise (a wrong image root
    looks like this). strict=True raises on the first unreadable image, naming it."""
    media_key, what = "image", "image"

    def __init__(self, ann_paths, image_roots, transform, max_words=50, strict=False, seed=0):
        super().__init__(seed)
        ann_paths, image_roots = _as_list(ann_paths), _as_list(image_roots)
        if len(ann_paths) != len(image_roots):
            raise ValueError(f"got {len(ann_paths)} annotation files but {len(image_roots)} roots; "
                             "give one root per annotation file")
        images, captions, self._root_ends = [], [], []
        for ann_path, root in zip(ann_paths, image_roots):
            if not os.path.isdir(root):
                raise FileNotFoundError(f"{self.what} root not found: {root} (for {ann_path})")
            for ann in load_annotations(ann_path, self.media_key):
                for caption in _captions(ann):
                    images.append(self.media_path(root, ann[self.media_key]))
                    captions.append(caption)
            self._root_ends.append(len(captions))  # samples [previous end, this end) use this root
        self.images, self.captions = _StringArray(images), _StringArray(captions)
        self.image_roots, self.source = image_roots, ", ".join(ann_paths)
        self.transform, self.max_words, self.strict = transform, max_words, strict
        # paths found unreadable, per process (each DataLoader worker has its own): warned about once, then
        # passed over without another decode attempt. Small: only bad files are kept.
        self._bad = set()

    def __len__(self):
        return len(self.captions)

    @staticmethod
    def media_path(root, name):
        """The file read for an entry's media (image, video, or its features)."""
        return os.path.join(root, name)

    def load(self, path, i):
        """The decoded media of sample i (an image here; frames or features in the subclasses below), decoded in
        full here, not lazily in the transform, so that a truncated file fails inside readable's error handling."""
        with Image.open(path) as img:
            return img.convert("RGB")

    def item(self, media, i):
        """The sample's tensors, augmented with the seeds of sample i."""
        return {"image": self.augment(self.transform, i)(media)}

    def readable(self, i):
        """(j, decoded media): the first readable sample j = i, i+1, ... (wrapping around), per the rule above."""
        n = len(self)
        tries = min(MAX_CONSECUTIVE_UNREADABLE, n)
        for skipped in range(tries):
            j = (i + skipped) % n
            path = self.images[j]
            if path in self._bad:
                continue
            try:
                return j, self.load(path, i)
            except Exception as e:  # PIL and PyAV signal broken files with many exception types
                _unreadable(f"{self.what} {path}", e, self.strict)
                self._bad.add(path)
        root = self.image_roots[bisect.bisect_right(self._root_ends, i)]
        raise RuntimeError(f"{tries} consecutive unreadable {self.what}s from sample {i}, the first "
                           f"{self.images[i]}; check the root ({root})")

    def shown(self, item, i, j):
        """Sample i's dict: its tensors `item`, and the caption and file of sample j, the readable one shown."""
        path = self.images[j]
        return {**item, "text": clean_caption(self.captions[j], self.max_words), "image_id": image_id_of(path),
                "skipped": (j - i) % len(self), "file": path}

    def __getitem__(self, i):
        i = range(len(self))[i]  # negative indices as for a list; IndexError outside
        j, media = self.readable(i)
        return self.shown(self.item(media, i), i, j)


class VideoTextDataset(ImageTextDataset):
    """Video-caption pairs in LAVIS's formats (MSRVTT / MSVD / VATEX: {"video": "name.mp4", "caption": ...};
    WebVid: {"videoid", "name"}), JSON or JSONL, one video root per file. Each sample is a clip of num_frames
    frames decoded with PyAV, sampled "headtail" with the same random crop and flip for all its frames (augment:
    training) or "uniform" and resized (evaluation, and training without augmentation): {"image": T x 3 x S x S,
    "frame_mask": T (1 = a real frame; a short clip is padded)}.
    An unreadable video (missing, empty, truncated, not a video) is skipped and counted as an image is."""
    media_key, what = "video", "video"

    def __init__(self, ann_paths, video_roots, image_size, num_frames, augment, max_words=50, strict=False, seed=0):
        super().__init__(ann_paths, video_roots, ClipTransform(image_size, augment), max_words, strict, seed)
        self.num_frames, self.sampling = num_frames, "headtail" if augment else "uniform"

    def load(self, path, i):
        rng = random.Random(hash((self.seed, int(self._epoch[0]), i)))
        return decode_frames(path, self.num_frames, self.sampling, rng)

    def item(self, frames, i):
        return pad_clip(self.augment(self.transform, i)(frames), self.num_frames)


FLOAT16_MAX = 65504.0  # the model runs under half-precision autocast: larger features overflow to inf


def load_clip_features(path, num_frames, feature_dim=0):
    """The first num_frames segments of a video's pre-extracted features, num_frames x F, read from name.npy beside
    where name.mp4 would be (path names either): an S x F array, or 1 x S x F as the official VATEX files are.
    Features that would poison training are a BadSample naming the .npy file: values that are not finite or lie
    beyond float16's range, or (with feature_dim) another width F."""
    path = os.path.splitext(path)[0] + ".npy"
    try:
        features = torch.from_numpy(np.load(path, allow_pickle=False)).float()
    except Exception as e:  # missing, truncated, not an .npy, pickled objects
        why = getattr(e, "strerror", None) or e
        raise BadSample(f"cannot read feature file {path}: {type(e).__name__}: {why}") from None
    if features.ndim == 3 and len(features) == 1:
        features = features[0]
    if features.ndim != 2 or not len(features):
        raise BadSample(f"feature file {path}: expected an S x F (or 1 x S x F) array, got shape "
                        f"{tuple(features.shape)}")
    if feature_dim and features.shape[1] != feature_dim:
        raise BadSample(f"feature file {path}: {features.shape[1]} features per segment, feature_dim is {feature_dim}")
    features = features[:num_frames]
    bad = ~(features.abs() <= FLOAT16_MAX)  # nan compares false
    if bad.any():
        raise BadSample(f"feature file {path}: {int(bad.sum())} values are nan, inf or beyond float16's range "
                        f"(largest {features.abs().nan_to_num(0).max().item():.3g})")
    return features


class ClipFeatureDataset(ImageTextDataset):
    """Pre-extracted clip features (e.g. I3D, S segments x 1024) in place of videos: for each annotation entry's
    "video" (name.mp4), the array root/name.npy, S x F, cut or zero-padded to num_frames segments with a mask, as
    the P-Former paper's VATEX runs read them: {"image": T x F, "frame_mask": T}. A file whose features are not
    finite or not F = feature_dim wide is skipped and counted as an unreadable image is (load_clip_features)."""
    media_key, what = "video", "feature file"

    def __init__(self, ann_paths, feature_roots, num_frames, max_words=50, strict=False, seed=0, feature_dim=0):
        super().__init__(ann_paths, feature_roots, None, max_words, strict, seed)
        self.num_frames, self.feature_dim = num_frames, feature_dim

    @staticmethod
    def media_path(root, name):
        return os.path.splitext(os.path.join(root, name))[0] + ".npy"

    def load(self, path, i):
        return load_clip_features(path, self.num_frames, self.feature_dim)

    def item(self, features, i):
        return pad_clip(features, self.num_frames)


class FrozenFeatureDataset(Dataset):
    """An ImageTextDataset (or VideoTextDataset) with each image (clip) replaced by the frozen image encoder's output
    for it (N x width, or T x N x width), computed once per distinct file by `encode` and kept in CPU memory; the
    encoder passes such features through. Only for runs without augmentation (augment=False: no crop, no flip, and
    clips sampled uniformly), where the encoder sees the same pixels every epoch: its forward then runs once per file
    instead of once per sample and epoch. Memory: files x N x width in the encoder's dtype (COCO's 113k images at
    ViT-g's 257 x 1408 in fp16: 82 GB), so this is for small datasets and fast ablations. Under DDP every rank
    computes all of them. An unreadable file is replaced by the next readable sample's, as in the dataset."""

    def __init__(self, dataset, encode, batch_size=64):
        if not isinstance(dataset, ImageTextDataset):
            raise TypeError("FrozenFeatureDataset needs annotation files (an ImageTextDataset): tar shards are "
                            "streamed once, not indexed")
        self.dataset, self.source = dataset, dataset.source
        row_of_path, todo, chunks, masks = {}, [], [], []  # path -> its row in self.features (None: unreadable)

        def flush():
            if todo:
                chunks.append(encode(torch.stack([it["image"] for it in todo])).cpu())
                masks.extend(it.get("frame_mask") for it in todo)
                todo.clear()

        self.sample, self.row = [], []  # for sample i: the readable sample j shown, and its row
        for i in range(len(dataset)):
            j = i
            while True:
                path = dataset.images[j]
                if path not in row_of_path:
                    try:
                        todo.append(dataset.item(dataset.load(path, j), j))
                        row_of_path[path] = len(masks) + len(todo) - 1  # rows count the readable files only
                    except Exception as e:  # PIL and PyAV signal broken files with many exception types
                        _unreadable(f"{dataset.what} {path}", e, dataset.strict)
                        row_of_path[path] = None
                    if len(todo) == batch_size:
                        flush()
                if row_of_path[path] is not None:
                    break
                j = (j + 1) % len(dataset)
                if j == i:
                    raise RuntimeError(f"no readable {dataset.what} in {dataset.image_roots}")
            self.sample.append(j)
            self.row.append(row_of_path[path])
        flush()
        self.features, self.masks = torch.cat(chunks), masks  # files x N x width (x T first for clips)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        i = range(len(self))[i]
        row, mask = self.row[i], self.masks[self.row[i]]
        item = {"image": self.features[row]} if mask is None else {"image": self.features[row], "frame_mask": mask}
        return self.dataset.shown(item, i, self.sample[i])


class TextDataset(Dataset):
    """Text-only samples for P-Former stage 0: .txt files (one sentence per line, blank lines ignored) and
    caption .json/.jsonl annotation files read without images (every caption is a sample; "image" keys are
    optional). Items are {"text": cleaned string, "skipped": 0}, as a text-only TarShardDataset's."""

    def __init__(self, paths, max_words=50):
        sentences = []
        for path in _as_list(paths):
            if path.endswith(".txt"):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"text file not found: {path}")
                with open(path, encoding="utf-8") as f:
                    sentences.extend(line.strip() for line in f if line.strip())
            elif path.endswith((".json", ".jsonl")):
                for ann in load_annotations(path, media_key=None):
                    sentences.extend(_captions(ann))
            else:
                raise ValueError(f"{path}: unknown text file type (expected .txt, .json or .jsonl)")
        self.sentences, self.max_words, self.source = _StringArray(sentences), max_words, ", ".join(_as_list(paths))

    def __len__(self):
        return len(self.sentences)

    def __getitem__(self, i):
        return {"text": clean_caption(self.sentences[i], self.max_words), "skipped": 0}

# -----------------------------------------------------------------------------
# webdataset tar shards

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(shards):
    """Shard list from a path, a glob pattern, a brace pattern ('/data/{00000..00099}.tar', webdataset's
    expansion), or a list of any of these. Every shard must exist (a glob that matches nothing is named)."""
    paths = [path for spec in _as_list(shards) for pattern in wds.shardlists.expand_urls(spec)
             for path in (sorted(glob.glob(pattern)) or [pattern])]
    if not paths:
        raise ValueError(f"no shards given: {shards!r}")
    missing = next((p for p in paths if not os.path.isfile(p)), None)
    if missing:
        raise FileNotFoundError(f"shard not found: {missing}")
    return paths


def _numbered(samples):
    """Each sample with "__index__", its place in the stream."""
    for index, sample in enumerate(samples):
        yield {**sample, "__index__": index}


class TarShardDataset(IterableDataset):
    """Streams samples from webdataset tar shards (the img2dataset layout: key.jpg / .jpeg / .png / .webp next to
    key.txt and/or key.json with a "caption"; .txt wins) or, with num_frames, clips (key.mp4 ... + key.txt, decoded
    as VideoTextDataset does, its transform a ClipTransform). Samples without a caption (or image) are passed over
    silently. Items: {"image", "text", "image_id", "skipped"}, or with transform=None {"text", "skipped"}, images
    unread (stage 0). An undecodable sample is never yielded (DDP's feature gathering needs full batches): a
    warning names it and "skipped", on the next item yielded, counts those passed over since the previous one;
    strict=True raises. A corrupt shard warns (or raises) and loses the rest of that shard, uncounted.

    A webdataset pipeline: each epoch the shard list is shuffled with seed + epoch, split across DDP ranks, then
    across each rank's DataLoader workers, so every shard is read by exactly one (rank, worker) (ranks can get
    different numbers of samples); a shuffle buffer mixes each stream. Resume: set_epoch(epoch), then skip(n) drops
    the first n samples of every stream in that epoch, read but not decoded. The streams are deterministic, so this
    is exact when n is what each stream had consumed; the usual estimate, steps * batch_size / num_workers, is
    approximate when undecodable samples were passed over."""

    def __init__(self, shards, transform, max_words=50, strict=False, shuffle_buffer=1000, seed=0,
                 rank=None, world_size=None, num_frames=0, sampling="headtail"):
        self.shards, self.num_frames, self.sampling = expand_shards(shards), num_frames, sampling
        self.source = f"tar shards {shards!r}"
        self.transform, self.max_words, self.strict = transform, max_words, strict
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        default_rank, default_world = rank_and_world_size()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.decoder = wds.Decoder([wds.imagehandler("pil")])  # txt -> str, json -> dict, images -> RGB PIL
        # [epoch, samples to skip, epoch the skip applies to], in shared memory: persistent DataLoader
        # workers keep their own copy of the dataset, and this is how set_epoch/skip still reach them.
        self._state = torch.tensor([0, 0, -1], dtype=torch.long).share_memory_()

    def set_epoch(self, epoch):
        self._state[0] = epoch

    def skip(self, n):
        """Skip the first n samples of each (rank, worker) stream in the current epoch (call after set_epoch)."""
        self._state[1], self._state[2] = n, self._state[0]

    def _read(self, shards):
        """webdataset's tar reader (files grouped into samples by key) on shards opened and closed here, which
        wds.tarfile_to_samples would leave to the garbage collector (a ResourceWarning per shard). A shard that
        cannot be read on is warned about (or raises, with strict) and the next one is read."""
        for url in (shard["url"] for shard in shards):
            def bad_shard(exn, url=url):
                _unreadable(f"shard {url}", exn, self.strict)
                return True  # webdataset's handler protocol: go on
            with open(url, "rb") as stream:
                files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=bad_shard)
                yield from wds.tariterators.group_by_keys(files, handler=bad_shard)

    def _files_read(self, sample):
        """The files of a sample that are read: its caption (.txt, else .json) and, unless text only, its image or
        clip; None (the sample is passed over silently) when it lacks one."""
        wanted = [("txt", "json")]
        if self.transform is not None:
            wanted.append(VIDEO_EXTENSIONS if self.num_frames else IMAGE_EXTENSIONS)
        found = [next((e for e in extensions if e in sample), None) for extensions in wanted]
        return None if None in found else {"__url__": sample["__url__"], **{e: sample[e] for e in found}}

    def _decode(self, sample, stream):
        """A sample's files -> {"image" (a clip: and "frame_mask"), "text", "image_id", "file"}, or {"text"} for
        text only, augmented with seeds from its place in the stream: (seed, epoch, rank, worker) + its index.
        Anything unreadable raises a BadSample naming the sample."""
        name, key = f"{sample['__url__']}:{sample['__key__']}", (*stream, sample["__index__"])
        try:
            files = self.decoder(sample)
            caption = files["txt"] if "txt" in files else files["json"].get("caption")
            if not isinstance(caption, str):
                raise ValueError(f"no string \"caption\" in {name}.json")
            item = {"text": clean_caption(caption, self.max_words)}
            if self.transform is None:
                return item
            if self.num_frames:
                video = io.BytesIO(next(files[e] for e in VIDEO_EXTENSIONS if e in files))
                frames = decode_frames(video, self.num_frames, self.sampling, random.Random(hash(key)))
                item.update(pad_clip(seeded(self.transform, *key)(frames), self.num_frames))
            else:
                item["image"] = seeded(self.transform, *key)(next(files[e] for e in IMAGE_EXTENSIONS if e in files))
        except Exception as e:  # PIL and PyAV signal broken files with many exception types
            # webdataset's decoder (from 0.2.107) wraps the file's own error in a DecodingError that says nothing
            cause = e.__cause__ if isinstance(e, getattr(wds, "DecodingError", ())) else e
            raise BadSample(_cannot_read(f"sample {name}", cause)) from e
        return {**item, "image_id": image_id_of(name), "file": name}

    def __iter__(self):
        epoch, n_skip, skip_epoch = self._state.tolist()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if len(self.shards) < self.world_size * num_workers:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world_size} ranks x {num_workers} "
                             f"workers; use at least {self.world_size * num_workers} shards or fewer workers")
        passed_over = [0]  # undecodable samples since the last one yielded

        def bad_sample(exn):
            _unreadable("sample", exn, self.strict)
            passed_over[0] += 1
            return True  # webdataset's handler protocol: go on with the next sample

        def with_skip_counts(items):
            for item in items:
                yield {**{k: v for k, v in item.items() if k != "__key__"}, "skipped": passed_over[0]}
                passed_over[0] = 0

        shuffle_rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")  # str seeds are stable across runs
        return iter(wds.DataPipeline(
            wds.SimpleShardList(self.shards, seed=self.seed + epoch),  # the same order on every rank and worker
            # by our rank: wds.split_by_node reads it from the environment, not from the rank this dataset was given
            wds.slice(self.rank, None, self.world_size),
            wds.split_by_worker,
            self._read,
            wds.map(self._files_read),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=shuffle_rng)
            if self.shuffle_buffer > 1 else None,
            _numbered,
            wds.slice(n_skip if epoch == skip_epoch else 0, None),  # resume: these are read, not decoded
            wds.map(partial(self._decode, stream=(self.seed, epoch, self.rank, worker)), handler=bad_sample),
            with_skip_counts,
        ))

# -----------------------------------------------------------------------------
# batching and loading


def collate(items):
    """Sample dicts -> a batch dict: tensors stacked ("image_id" as int64), strings listed, "skipped" summed.
    B is always the number of items: the datasets replace unreadable samples instead of dropping them."""
    batch = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key == "skipped":
            batch[key] = sum(values)
        elif torch.is_tensor(values[0]):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch


class ResumableDistributedSampler(DistributedSampler):
    """torch's DistributedSampler plus set_start(index): the current epoch's iteration begins at this rank's
    index-th sample, so a killed run resumes exactly. The start resets to 0 once the epoch has been fully
    iterated. len() is the number of samples still to come in the epoch."""

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, seed=0, drop_last=True):
        default_rank, default_world = rank_and_world_size()  # torch's defaults need a process group
        super().__init__(dataset, default_world if num_replicas is None else num_replicas,
                         default_rank if rank is None else rank, shuffle, seed, drop_last)
        if self.num_samples <= 0:
            source = getattr(dataset, "source", "the dataset")
            raise ValueError(f"{source}: {len(dataset)} samples are too few for {self.num_replicas} ranks")
        self.start = 0

    def set_start(self, index):
        if not 0 <= index <= self.num_samples:
            raise ValueError(f"start {index} is outside [0, {self.num_samples}] samples per rank")
        self.start = index

    def __iter__(self):
        yield from list(super().__iter__())[self.start:]
        self.start = 0  # reached only when the epoch was iterated to the end

    def __len__(self):
        return self.num_samples - self.start


def seed_worker(worker_id):
    """DataLoader worker_init_fn: seed numpy and random from the worker's torch seed (which the DataLoader
    derives from its generator and the worker id), for any randomness outside the seeded augmentation. SIGTERM
    and SIGINT are for the main process, which stops the run in order (a scheduler signals all of a job's
    processes, Ctrl-C the terminal's): a worker ignores them and ends with its main process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def dataset_identity(dataset):
    """A short hash of what a training set holds, for a resumed run to check: its samples' files and captions
    (annotation files), its sentences (text files), or its shards' paths and sizes (tar shards, not read)."""
    h = hashlib.blake2b(digest_size=8)
    dataset = getattr(dataset, "dataset", dataset)  # FrozenFeatureDataset: the dataset it encodes
    if isinstance(dataset, TarShardDataset):
        h.update(json.dumps([[s, os.path.getsize(s)] for s in dataset.shards]).encode())
    for strings in (getattr(dataset, name, None) for name in ("images", "captions", "sentences")):
        if strings is not None:
            h.update(strings.offsets.tobytes())
            h.update(strings.buffer.tobytes())
    return h.hexdigest()


def build_loader(dataset, batch_size, num_workers, seed=0, shuffle=True, drop_last=True):
    """DataLoader plus its ResumableDistributedSampler (None for an IterableDataset, which shards and shuffles
    itself; shuffle then has no effect). A training set that cannot fill one batch per rank fails here, naming it
    (a stream is checked when its first epoch ends empty). Returns (loader, sampler)."""
    sampler = None
    if not isinstance(dataset, IterableDataset):
        sampler = ResumableDistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        if drop_last and len(sampler) < batch_size:
            raise ValueError(f"{dataset.source}: {len(sampler)} samples per rank, fewer than one batch of "
                             f"{batch_size}: no batch can be formed")
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available(), drop_last=drop_last, persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker, generator=generator,
    )
    return loader, sampler


def image_text_loader(ann_paths, roots, shards, batch_size, num_workers, image_size, train=True, augment=True, seed=0,
                      strict=False, encode=None, video=False, num_frames=1, feature_dim=0):
    """The DataLoader of stages 1 and 2: tar `shards` when given (streamed, split over ranks and workers), else the
    annotation files with their roots. Images (augmented for training with `augment`), or with `video` clips of
    num_frames frames, or with feature_dim pre-extracted clip features. With `encode` (the frozen image encoder),
    "image" holds its features, computed once (FrozenFeatureDataset). A loader that is not for training keeps its
    last partial batch (a validation set smaller than a batch is still evaluated) and does not shuffle."""
    augment = train and augment
    image_tf = train_transform(image_size) if augment else eval_transform(image_size)
    if shards:
        if encode is not None or feature_dim:
            raise ValueError("cached image features and clip features need annotation files (train_ann), not shards")
        transform = ClipTransform(image_size, augment) if video else image_tf
        dataset = TarShardDataset(shards, transform, strict=strict, seed=seed, num_frames=num_frames if video else 0,
                                  sampling="headtail" if augment else "uniform")
    elif not ann_paths:
        raise ValueError("no training data: give annotation files (train_ann) or tar shards (train_shards)")
    elif feature_dim:
        dataset = ClipFeatureDataset(ann_paths, roots, num_frames, strict=strict, seed=seed, feature_dim=feature_dim)
    elif video:
        dataset = VideoTextDataset(ann_paths, roots, image_size, num_frames, augment, strict=strict, seed=seed)
    else:
        dataset = ImageTextDataset(ann_paths, roots, image_tf, strict=strict, seed=seed)
    if encode is not None:
        if feature_dim:
            raise ValueError("cache_vit_features is for images and clips, not for pre-extracted features")
        dataset = FrozenFeatureDataset(dataset, encode, batch_size)
    return build_loader(dataset, batch_size, num_workers, seed=seed, shuffle=train, drop_last=train)[0]


def text_loader(paths, shards, batch_size, num_workers, seed=0, validation=False):
    """The text-only DataLoader of P-Former's stage 0: tar `shards` read without images when given, else
    text files (.txt, one sentence per line) and caption annotations (.json / .jsonl). Batches: {"text", "skipped"}."""
    if shards:
        dataset = TarShardDataset(shards, transform=None, seed=seed)
    else:
        if not paths:
            raise ValueError("no text data: give text / annotation files (train_text) or tar shards (train_shards)")
        dataset = TextDataset(paths)
    return build_loader(dataset, batch_size, num_workers, seed=seed, shuffle=not validation,
                        drop_last=not validation)[0]

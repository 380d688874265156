"""
Data for BLIP-2 / P-Former training: caption cleaning, image transforms, image-text datasets (annotation
files or webdataset tar shards), text-only datasets for P-Former stage 0, collate functions, a
resumable distributed sampler, and the quick start's world (shape scenes with captions and questions, and a
text-only corpus; written by write_shape_world).
"""

import bisect
import glob
import io
import json
import math
import os
import random
import re
import tarfile
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from torchvision import transforms
from torchvision.transforms import InterpolationMode

# -----------------------------------------------------------------------------
# captions and images

_PUNCTUATION = re.compile(r'[.!"()*#:;~]')


def clean_caption(text, max_words=50):
    """BLIP's `blip_caption` cleaning: lowercase, punctuation .!"()*#:;~ -> space, one space between words,
    at most max_words words."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def _decode_image(source):
    """Open and fully decode an image (path or file object) as RGB. Decoding here, not lazily in the
    transform, makes a truncated file fail inside the caller's error handling."""
    with Image.open(source) as img:
        return img.convert("RGB")


def _unreadable(name, err, strict):
    """The skip/strict rule for a bad image or shard: raise, or warn in one line (the caller then moves on to
    the next sample and counts the skip)."""
    msg = f"cannot read {name}: {type(err).__name__}: {' '.join(str(err).split())}"
    if strict:
        raise RuntimeError(msg) from err
    warnings.warn("skipping: " + msg)


MAX_CONSECUTIVE_UNREADABLE = 100

# -----------------------------------------------------------------------------
# annotation files


def _check_entry(ann, path, where, require_image):
    if not isinstance(ann, dict):
        raise ValueError(f"{path} {where}: expected an object, got {type(ann).__name__}")
    if require_image and not (isinstance(ann.get("image"), str) and ann["image"]):
        raise ValueError(f"{path} {where}: missing or invalid \"image\" (a relative path string)")
    if "caption" not in ann:
        raise ValueError(f"{path} {where}: missing \"caption\"")
    caption = ann["caption"]
    if isinstance(caption, list):
        if not caption:
            raise ValueError(f"{path} {where}: empty caption list")
        if not all(isinstance(c, str) for c in caption):
            raise ValueError(f"{path} {where}: caption list holds a non-string")
    elif not isinstance(caption, str):
        raise ValueError(f"{path} {where}: caption must be a string or a list of strings, "
                         f"got {type(caption).__name__}")


def load_annotations(path, require_image=True):
    """Read a LAVIS-style annotation file: a JSON list of {"image": ..., "caption": str or [str, ...]}
    objects, or JSONL (one object per line) when the name ends in .jsonl. Errors name the file and the
    entry (0-based list index for JSON, 1-based line number for JSONL)."""
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
    for where, ann in entries:
        _check_entry(ann, path, where, require_image)
    return [ann for _, ann in entries]


def _as_list(x):
    return [os.fspath(x)] if isinstance(x, (str, os.PathLike)) else [os.fspath(p) for p in x]


def _captions(ann):
    return ann["caption"] if isinstance(ann["caption"], list) else [ann["caption"]]


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


class ImageTextDataset(Dataset):
    """Image-caption pairs from one or more annotation files, each with its own image root. An entry with a
    list of captions gives one sample per caption. Items are (image tensor, cleaned caption, skipped).

    An unreadable (missing, corrupt, truncated) image never shrinks a batch, because ITC/ITM gather features
    across DDP ranks and need equal batch sizes: with strict=False, sample i is replaced by the next readable
    one (i+1, i+2, ... wrapping around), skipped counts the unreadable samples passed over (0 normally), and
    one warning per file names it. MAX_CONSECUTIVE_UNREADABLE bad samples in a row raise (a wrong image root
    looks like this). strict=True raises on the first unreadable image, naming it."""

    def __init__(self, ann_paths, image_roots, transform, max_words=50, strict=False):
        ann_paths, image_roots = _as_list(ann_paths), _as_list(image_roots)
        if len(ann_paths) != len(image_roots):
            raise ValueError(f"got {len(ann_paths)} annotation files but {len(image_roots)} image roots; "
                             "give one image root per annotation file")
        images, captions, self._root_ends = [], [], []
        for ann_path, root in zip(ann_paths, image_roots):
            if not os.path.isdir(root):
                raise FileNotFoundError(f"image root not found: {root} (for {ann_path})")
            for ann in load_annotations(ann_path):
                for caption in _captions(ann):
                    images.append(os.path.join(root, ann["image"]))
                    captions.append(caption)
            self._root_ends.append(len(captions))  # samples [previous end, this end) use this root
        self.images, self.captions = _StringArray(images), _StringArray(captions)
        self.image_roots = image_roots
        self.transform, self.max_words, self.strict = transform, max_words, strict
        # paths found unreadable, per process (each DataLoader worker has its own): warned about once, then
        # passed over without another decode attempt. Small: only bad files are kept.
        self._bad = set()

    def __len__(self):
        return len(self.captions)

    def _root_of(self, i):
        return self.image_roots[bisect.bisect_right(self._root_ends, i)]

    def __getitem__(self, i):
        n = len(self)
        i = range(n)[i]  # negative indices as for a list; IndexError outside
        tries = min(MAX_CONSECUTIVE_UNREADABLE, n)
        for skipped in range(tries):
            j = (i + skipped) % n
            path = self.images[j]
            if path in self._bad:
                continue
            try:
                image = _decode_image(path)
            except Exception as e:  # PIL signals broken files with many exception types
                _unreadable(f"image {path}", e, self.strict)
                self._bad.add(path)
                continue
            return self.transform(image), clean_caption(self.captions[j], self.max_words), skipped
        raise RuntimeError(f"{tries} consecutive unreadable images from sample {i}, the first {self.images[i]}; "
                           f"check the image root ({self._root_of(i)})")


class FrozenFeatureDataset(Dataset):
    """An ImageTextDataset with each image replaced by the frozen image encoder's output for it (N x width),
    computed once per distinct image by `encode` (B x 3 x H x W -> B x N x width) and kept in CPU memory; the
    Q-Former's FrozenViT passes such features through. Only for runs without augmentation (augment=False),
    where the encoder sees the same pixels every epoch: its forward then runs once per image instead of once
    per sample and epoch. Memory: images x N x width in the encoder's dtype (COCO's 113k images at ViT-g's
    257 x 1408 in fp16: 82 GB), so this is for small datasets and fast ablations. Images are decoded in this
    process; under DDP every rank computes all of them (the sampler deals samples anew each epoch). An
    unreadable image is replaced by the next readable sample's, as in ImageTextDataset."""

    def __init__(self, dataset, encode, batch_size=64):
        if not isinstance(dataset, ImageTextDataset):
            raise TypeError("FrozenFeatureDataset needs annotation files (an ImageTextDataset): tar shards are "
                            "streamed once, not indexed")
        self.captions, self.max_words = dataset.captions, dataset.max_words
        n = len(dataset)
        row_of_path = {}  # image path -> its row in self.features, or -1 when unreadable
        todo, chunks, n_rows = [], [], 0  # images waiting for the encoder, encoded chunks, rows so far

        def flush():
            if todo:
                chunks.append(encode(torch.stack(todo)).cpu())
                todo.clear()

        for i in range(n):
            path = dataset.images[i]
            if path in row_of_path:
                continue
            try:
                todo.append(dataset.transform(_decode_image(path)))
            except Exception as e:  # PIL signals broken files with many exception types
                _unreadable(f"image {path}", e, dataset.strict)
                row_of_path[path] = -1
                continue
            row_of_path[path], n_rows = n_rows, n_rows + 1
            if len(todo) == batch_size:
                flush()
        flush()
        if not chunks:
            raise RuntimeError(f"no readable image in {dataset.image_roots}")
        self.features = torch.cat(chunks)  # images x N x width
        rows = torch.tensor([row_of_path[dataset.images[i]] for i in range(n)])
        # sample i shows the image of the first sample j >= i (wrapping around) whose image is readable
        readable = (rows >= 0).nonzero().flatten()
        nxt = torch.searchsorted(readable, torch.arange(n))
        wrapped = nxt == len(readable)
        j = torch.where(wrapped, readable[0], readable[nxt.clamp(max=len(readable) - 1)])
        self.sample = j  # the sample whose caption and image are shown for i
        self.row = rows[j]
        self.skipped = torch.where(wrapped, j + n, j) - torch.arange(n)

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        i = range(len(self))[i]
        j = int(self.sample[i])
        return self.features[self.row[i]], clean_caption(self.captions[j], self.max_words), int(self.skipped[i])


class TextDataset(Dataset):
    """Text-only samples for P-Former stage 0: .txt files (one sentence per line, blank lines ignored) and
    caption .json/.jsonl annotation files read without images (every caption is a sample; "image" keys are
    optional). Items are (cleaned string, 0): the same shape as TarShardDataset's text items, whose 0 counts
    the samples skipped before it."""

    def __init__(self, paths, max_words=50):
        sentences = []
        for path in _as_list(paths):
            if path.endswith(".txt"):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"text file not found: {path}")
                with open(path, encoding="utf-8") as f:
                    sentences.extend(line.strip() for line in f if line.strip())
            elif path.endswith((".json", ".jsonl")):
                for ann in load_annotations(path, require_image=False):
                    sentences.extend(_captions(ann))
            else:
                raise ValueError(f"{path}: unknown text file type (expected .txt, .json or .jsonl)")
        self.sentences, self.max_words = _StringArray(sentences), max_words

    def __len__(self):
        return len(self.sentences)

    def __getitem__(self, i):
        return clean_caption(self.sentences[i], self.max_words), 0

# -----------------------------------------------------------------------------
# webdataset-style tar shards

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def _expand_braces(pattern):
    """'/d/{000..002}.tar' -> ['/d/000.tar', '/d/001.tar', '/d/002.tar'] (zero padding kept); '{a,b}' lists too."""
    m = _BRACE_RANGE.search(pattern) or _BRACE_LIST.search(pattern)
    if m is None:
        return [pattern]
    if m.re is _BRACE_RANGE:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = m.group(1).split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [p for o in options for p in _expand_braces(head + o + tail)]


def expand_shards(shards):
    """Shard list from a path, a glob pattern, a brace pattern ('/data/{00000..00099}.tar'), or a list of any
    of these. Every shard must exist."""
    paths = []
    for spec in _as_list(shards):
        for p in _expand_braces(spec):
            if any(c in p for c in "*?["):
                matched = sorted(glob.glob(p))
                if not matched:
                    raise FileNotFoundError(f"no shards match {p}")
                paths.extend(matched)
            else:
                paths.append(p)
    if not paths:
        raise ValueError(f"no shards given: {shards!r}")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"shard not found: {p}")
    return paths


def _read_shard(path, extensions):
    """Yield (key, {extension: bytes}) per sample of a tar shard. Members 'dir/key.ext' with the same key
    are one sample and must be adjacent (as img2dataset and webdataset write them). Only the wanted
    extensions are read."""
    key, files = None, {}
    with tarfile.open(path, mode="r|*") as tar:  # streaming mode: one sequential pass, no index
        for member in tar:
            if not member.isfile():
                continue
            dirname, base = os.path.split(member.name)
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            k = os.path.join(dirname, stem)
            if k != key:
                if files:
                    yield key, files
                key, files = k, {}
            ext = ext.lower()
            if ext in extensions:
                files[ext] = tar.extractfile(member).read()
    if files:
        yield key, files


def _shuffled(samples, buffer_size, rng):
    """Approximate shuffle of a stream: keep buffer_size items and emit a random one for each new one."""
    buffer = []
    for s in samples:
        if len(buffer) < buffer_size:
            buffer.append(s)
            continue
        j = rng.randrange(buffer_size)
        buffer[j], s = s, buffer[j]
        yield s
    rng.shuffle(buffer)
    yield from buffer


class TarShardDataset(IterableDataset):
    """Streams image-text samples from webdataset-style tar shards (the img2dataset layout: key.jpg / .jpeg /
    .png / .webp next to key.txt and/or key.json with a "caption"; .txt wins). Samples missing an image or a
    caption are passed over silently. Items are (image tensor, cleaned caption, skipped) or, with
    transform=None, (cleaned caption, skipped) without reading images (text-only stage 0). An undecodable
    sample is never yielded (batches keep their size, which DDP's feature gathering needs): with
    strict=False a warning names it and skipped, on the next item yielded, counts the undecodable samples
    passed over since the previous item (0 normally); strict=True raises. A corrupt shard warns (or raises)
    and loses the rest of that shard, uncounted.

    Each epoch the shard list is shuffled with seed + epoch, split across DDP ranks, then across the
    DataLoader workers of each rank, so every shard is read by exactly one (rank, worker); a shuffle buffer
    mixes samples within each stream. Ranks can get different numbers of samples (shards differ in size),
    so a DDP training loop should run a fixed number of steps per epoch rather than exhaust the stream.

    Resume: set_epoch(epoch), then skip(n) drops the first n samples of every (rank, worker) stream in that
    epoch; skipped samples are read but not decoded. The streams are deterministic, so this is exact when
    n is the number of stream samples each stream had consumed (items delivered plus undecodable samples
    passed over); the usual estimate, steps * batch_size / num_workers, is approximate because workers
    deliver batches round-robin only until the first runs dry, and because undecodable samples are not in it.
    """

    def __init__(self, shards, transform, max_words=50, strict=False, shuffle_buffer=1000, seed=0,
                 rank=None, world_size=None):
        self.shards = expand_shards(shards)
        self.transform, self.max_words, self.strict = transform, max_words, strict
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        # [epoch, samples to skip, epoch the skip applies to], in shared memory: persistent DataLoader
        # workers keep their own copy of the dataset, and this is how set_epoch/skip still reach them.
        self._state = torch.tensor([0, 0, -1], dtype=torch.long).share_memory_()

    def set_epoch(self, epoch):
        self._state[0] = epoch

    def skip(self, n):
        """Skip the first n samples of each (rank, worker) stream in the current epoch (call after set_epoch)."""
        self._state[1], self._state[2] = n, self._state[0]

    def _my_shards(self, epoch):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if len(self.shards) < self.world_size * num_workers:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world_size} ranks x {num_workers} "
                             f"workers; use at least {self.world_size * num_workers} shards or fewer workers")
        order = list(self.shards)
        random.Random(self.seed + epoch).shuffle(order)  # the same order on every rank and worker
        return order[self.rank::self.world_size][worker::num_workers], worker

    def _samples(self, shards):
        """(name, files) for every usable sample of the given shards, in order."""
        caption_exts = ("txt", "json")
        wanted = caption_exts if self.transform is None else caption_exts + IMAGE_EXTENSIONS
        for shard in shards:
            try:
                for key, files in _read_shard(shard, wanted):
                    has_caption = any(e in files for e in caption_exts)
                    has_image = self.transform is None or any(e in files for e in IMAGE_EXTENSIONS)
                    if has_caption and has_image:
                        yield f"{shard}:{key}", files
            except (tarfile.TarError, OSError, EOFError) as e:  # truncated or corrupt shard: drop its rest
                _unreadable(f"shard {shard}", e, self.strict)

    def _decode(self, name, files):
        try:
            if "txt" in files:
                caption = files["txt"].decode("utf-8")
            else:
                caption = json.loads(files["json"]).get("caption")
                if not isinstance(caption, str):
                    raise ValueError(f"no string \"caption\" in {name}.json")
            if self.transform is None:
                return (clean_caption(caption, self.max_words),)
            ext = next(e for e in IMAGE_EXTENSIONS if e in files)
            image = _decode_image(io.BytesIO(files[ext]))
        except Exception as e:  # PIL signals broken files with many exception types
            _unreadable(f"sample {name}", e, self.strict)
            return None
        return self.transform(image), clean_caption(caption, self.max_words)

    def __iter__(self):
        epoch, n_skip, skip_epoch = self._state.tolist()
        shards, worker = self._my_shards(epoch)
        samples = self._samples(shards)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")  # str seeds are stable across runs
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        skipped = 0
        for i, (name, files) in enumerate(samples):
            if epoch == skip_epoch and i < n_skip:
                continue
            item = self._decode(name, files)
            if item is None:
                skipped += 1
                continue
            yield (*item, skipped)
            skipped = 0

# -----------------------------------------------------------------------------
# batching and loading


def collate_image_text(batch):
    """(image, text, skipped) items -> {"image": B x 3 x H x W, "text": [B strings], "skipped": total}.
    B is always the number of items: the datasets replace unreadable samples instead of dropping them."""
    return {"image": torch.stack([img for img, _, _ in batch]), "text": [t for _, t, _ in batch],
            "skipped": sum(s for _, _, s in batch)}


def collate_text(batch):
    """(text, skipped) items, from TextDataset or a text-only TarShardDataset -> {"text": [...], "skipped": total}."""
    return {"text": [t for t, _ in batch], "skipped": sum(s for _, s in batch)}


class ResumableDistributedSampler(Sampler):
    """torch's DistributedSampler plus set_start(index): the current epoch's iteration begins at this rank's
    index-th sample, so a killed run resumes exactly. The start resets to 0 once the epoch has been fully
    iterated. len() is the number of samples still to come in the epoch."""

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, seed=0, drop_last=True):
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside num_replicas {self.num_replicas}")
        self.dataset_size = len(dataset)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        if drop_last:
            self.num_samples = self.dataset_size // self.num_replicas
        else:
            self.num_samples = math.ceil(self.dataset_size / self.num_replicas)
        if self.num_samples == 0:
            raise ValueError(f"dataset of {self.dataset_size} samples is too small for {self.num_replicas} ranks")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_start(self, index):
        if not 0 <= index <= self.num_samples:
            raise ValueError(f"start {index} is outside [0, {self.num_samples}] samples per rank")
        self.start = index

    def _indices(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)  # the same permutation on every rank
            indices = torch.randperm(self.dataset_size, generator=g).tolist()
        else:
            indices = list(range(self.dataset_size))
        total = self.num_samples * self.num_replicas
        if total > len(indices):  # drop_last=False: pad by repeating from the start, as torch does
            indices = (indices * math.ceil(total / len(indices)))[:total]
        return indices[self.rank:total:self.num_replicas]

    def __iter__(self):
        yield from self._indices()[self.start:]
        self.start = 0  # reached only when the epoch was iterated to the end

    def __len__(self):
        return self.num_samples - self.start


def seed_worker(worker_id):
    """DataLoader worker_init_fn: seed numpy and random from the worker's torch seed (which the DataLoader
    derives from its generator and the worker id), so augmentations differ per worker and are reproducible."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(dataset, batch_size, num_workers, collate_fn, seed=0, shuffle=True, drop_last=True):
    """DataLoader plus its ResumableDistributedSampler (None for an IterableDataset, which shards and
    shuffles itself; shuffle then has no effect). Returns (loader, sampler)."""
    sampler = None
    if not isinstance(dataset, IterableDataset):
        sampler = ResumableDistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(), drop_last=drop_last, persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker, generator=generator,
    )
    return loader, sampler


def image_text_loader(ann_paths, image_roots, shards, transform, batch_size, num_workers, seed=0, strict=False,
                      shuffle=True, encode=None):
    """The image-caption DataLoader of stages 1 and 2: tar `shards` when given (streamed, split over ranks and
    workers), else the annotation files with their image folders. Batches: {"image", "text", "skipped"}.
    With `encode` (the frozen image encoder), "image" holds its features, computed once (FrozenFeatureDataset)."""
    if shards:
        if encode is not None:
            raise ValueError("cached image features need annotation files (train_ann), not tar shards")
        dataset = TarShardDataset(shards, transform, strict=strict, seed=seed)
    else:
        if not ann_paths:
            raise ValueError("no training data: give annotation files (train_ann) or tar shards (train_shards)")
        dataset = ImageTextDataset(ann_paths, image_roots, transform, strict=strict)
        if encode is not None:
            dataset = FrozenFeatureDataset(dataset, encode, batch_size)
    loader, _ = build_loader(dataset, batch_size, num_workers, collate_image_text, seed=seed, shuffle=shuffle)
    return loader


def text_loader(paths, shards, batch_size, num_workers, seed=0, shuffle=True):
    """The text-only DataLoader of P-Former's stage 0: tar `shards` read without images when given, else
    text files (.txt, one sentence per line) and caption annotations (.json / .jsonl). Batches: {"text", "skipped"}."""
    if shards:
        dataset = TarShardDataset(shards, transform=None, seed=seed)
    else:
        if not paths:
            raise ValueError("no text data: give text / annotation files (train_text) or tar shards (train_shards)")
        dataset = TextDataset(paths)
    loader, _ = build_loader(dataset, batch_size, num_workers, collate_text, seed=seed, shuffle=shuffle)
    return loader

# -----------------------------------------------------------------------------
# the quick start's world: shape scenes with captions and questions, and a text-only corpus
# (world.py renders them, writes the annotation files and pretrains the tiny backbones on them)

SCENE_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
                "purple": (150, 60, 190)}
SCENE_SHAPES = ["square", "circle", "triangle"]
SCENE_COUNTS = ["one", "two", "three"]
VQA_TEMPLATE = "Question: {} Short answer:"  # eval.py's zero-shot VQA prompt, which the LLM learns from text


def random_scene(rng, max_objects=3):
    """1-3 objects, each a colour (all different), a shape and a size, one per row (3 rows); listed top to bottom.
    Rows, not columns: the training crops keep vertical order, the horizontal flips would not keep left/right."""
    n = rng.randint(1, max_objects)
    rows = sorted(rng.sample(range(3), n))
    colors = rng.sample(list(SCENE_COLORS), n)
    return [dict(color=c, shape=rng.choice(SCENE_SHAPES), size=rng.choice(["big", "small"]), row=r,
                 x=rng.uniform(0.3, 0.7)) for c, r in zip(colors, rows)]


def _phrase(o):
    return f"a {o['size']} {o['color']} {o['shape']}"


def scene_caption(scene):
    """The canonical caption: the objects top to bottom, e.g. "a big red circle above a small blue square"."""
    return " above ".join(_phrase(o) for o in scene)


def scene_captions(scene):
    """Reference captions: the canonical one and two other phrasings (the training pairs and CIDEr's references)."""
    c = scene_caption(scene)
    return [c, f"a picture of {c}", f"there is {c}"]


def scene_questions(scene):
    """(question, answer, type) about colour, shape, size, count and relative position, answerable from the
    caption; single answers, scored by exact match."""
    out = [("how many shapes are there?", SCENE_COUNTS[len(scene) - 1], "count")]
    shapes = [o["shape"] for o in scene]
    for o in scene:
        if shapes.count(o["shape"]) == 1:
            out.append((f"what color is the {o['shape']}?", o["color"], "color"))
        out.append((f"what shape is the {o['color']} object?", o["shape"], "shape"))
        out.append((f"is the {o['color']} {o['shape']} big or small?", o["size"], "size"))
    for i, a in enumerate(scene):
        for j, b in enumerate(scene):
            if i != j:
                out.append((f"is the {a['color']} {a['shape']} above or below the {b['color']} {b['shape']}?",
                            "above" if i < j else "below", "position"))
    return out


def qa_sentence(question, answer):
    return VQA_TEMPLATE.format(question) + " " + answer


def render_shapes(scene, size=48):
    """The scene on a grey background: rows centred at 1/4, 1/2, 3/4 of the height (inside the training crops)."""
    from PIL import ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for o in scene:
        half = (0.12 if o["size"] == "big" else 0.07) * size
        cx, cy = o["x"] * size, (0.25 + 0.25 * o["row"]) * size
        box = (cx - half, cy - half, cx + half, cy + half)
        color = SCENE_COLORS[o["color"]]
        if o["shape"] == "square":
            draw.rectangle(box, fill=color)
        elif o["shape"] == "circle":
            draw.ellipse(box, fill=color)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=color)
    return image


def write_shape_world(out, n_train=2000, n_test=100, n_text=20000, image_size=48, seed=0):
    """The quick start's data under `out`: images/ (train and held-out test scenes), train.json (LAVIS captions),
    test_captions.json (eval.py task=caption), test_vqa.json (eval.py task=vqa), and a text-only corpus of
    n_text further scenes with no images: corpus_captions.txt, corpus_qa.txt. Returns the text-only scenes."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    splits = {"train": [], "test": []}
    vqa = []
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        scene = random_scene(rng)
        name = f"{split}_{i:05d}.png"
        render_shapes(scene, image_size).save(os.path.join(out, "images", name))
        splits[split].append({"image": name, "caption": scene_captions(scene), "scene": scene})
        if split == "test":  # one question of each type the scene allows
            by_type = {}
            for q, a, kind in scene_questions(scene):
                by_type.setdefault(kind, []).append((q, a))
            for kind, qas in by_type.items():
                q, a = rng.choice(qas)
                vqa.append({"question_id": len(vqa), "image": name, "question": q, "answer": a, "answer_type": kind})
    with open(os.path.join(out, "train.json"), "w") as f:
        json.dump(splits["train"], f)
    with open(os.path.join(out, "test_captions.json"), "w") as f:
        json.dump(splits["test"], f)
    with open(os.path.join(out, "test_vqa.json"), "w") as f:
        json.dump(vqa, f)
    text_scenes = [random_scene(rng) for _ in range(n_text)]
    with open(os.path.join(out, "corpus_captions.txt"), "w") as f:
        f.writelines(c + "\n" for s in text_scenes for c in scene_captions(s))
    with open(os.path.join(out, "corpus_qa.txt"), "w") as f:
        f.writelines(qa_sentence(q, a) + "\n" for s in text_scenes for q, a, _ in scene_questions(s))
    return text_scenes

"""
Video for BLIP-2 / P-Former: a clip's frames decoded with PyAV (FFmpeg inside its wheel), sampled as LAVIS samples
them, turned upright as the file's rotation says, one crop and flip for every frame of a clip, and padding to a
fixed number of frames with a mask. data.py's datasets and eval.py read clips through these.
"""

import numpy as np
import torch
from PIL import Image
from timm.data import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD
from torchvision import transforms
from torchvision.transforms import InterpolationMode


VIDEO_EXTENSIONS = ("mp4", "avi", "mkv", "webm", "mov")


def sample_frame_indices(n_total, num_frames, sampling, rng=None):
    """Which frames of a video of n_total frames, as LAVIS samples them: "uniform" (evaluation) the first frame of
    each of num_frames equal parts, np.arange(0, n, n / T); "headtail" (training) T/2 random frames from each half,
    sorted. A video with no more frames than num_frames gives all of them (pad_clip pads and masks the rest)."""
    if n_total <= num_frames:
        return list(range(n_total))
    if sampling == "uniform":
        return np.arange(0, n_total, n_total / num_frames).astype(int)[:num_frames].tolist()
    half, head = n_total // 2, num_frames // 2
    return sorted(rng.sample(range(half), head)) + sorted(rng.sample(range(half, n_total), num_frames - head))


def decode_frames(source, num_frames, sampling="uniform", rng=None, count=False):
    """The sampled frames (PIL images, in order) of a video: a path, or a file object such as the bytes of a clip
    in a tar shard, decoded with PyAV (FFmpeg in its wheel). Decoding stops after the last frame wanted. Containers
    that do not store their frame count (mkv, webm) are sampled from duration x frame rate, decoded a second time,
    to count (count=True), only when that estimate proves too high. A still image or a file without a video stream
    is not a video and raises."""
    import av

    with av.open(source) as container:
        if container.format.name == "image2" or container.format.name.endswith("_pipe"):
            raise ValueError(f"an image ({container.format.name}), not a video")
        if not container.streams.video:
            raise ValueError("no video stream in it (audio only?)")
        stream = container.streams.video[0]
        n_total = stream.frames  # from the container's header; 0 when it does not say
        estimated = n_total <= 0 and not count and bool(container.duration and stream.average_rate)
        if estimated:
            n_total = round(container.duration / av.time_base * stream.average_rate)
        if n_total <= 0:
            n_total = sum(1 for _ in container.decode(stream))
            container.seek(0)
        wanted = sample_frame_indices(n_total, num_frames, sampling, rng)
        if not wanted:
            raise ValueError("no video frame in it")
        frames, keep = {}, set(wanted)
        for index, frame in enumerate(container.decode(stream)):
            if index in keep:
                frames[index] = upright(frame)
            if index >= wanted[-1]:
                break
    if len(frames) < len(wanted) and estimated:  # fewer frames than duration x rate: count them, sample again
        if hasattr(source, "seek"):
            source.seek(0)
        return decode_frames(source, num_frames, sampling, rng, count=True)
    if len(frames) < len(wanted):
        raise ValueError(f"only {len(frames)} of the {len(wanted)} frames wanted could be decoded (truncated?)")
    return [frames[i] for i in wanted]


# PIL's turns, counter-clockwise as FFmpeg's display rotation is
_TURNS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def upright(frame):
    """A decoded frame as a PIL image the way players show it: turned by the video's display rotation (a phone
    stores a portrait clip as landscape frames plus "rotate 90"), which FFmpeg's player applies and PyAV does not."""
    image = frame.to_image()
    turn = round(getattr(frame, "rotation", 0) / 90) * 90 % 360  # an old PyAV without it: frames as stored
    return image.transpose(_TURNS[turn]) if turn else image


class ClipTransform:
    """A clip's frames (PIL images) -> T x 3 x S x S: for training one random crop of 50-100% of the area and one
    flip for all the frames of the clip (an object must not jump between frames), for evaluation the resize;
    CLIP normalisation. Draws from torch's random state, which the datasets seed per sample."""

    def __init__(self, image_size, train):
        self.image_size, self.train = image_size, train
        self.normalize = transforms.Normalize(CLIP_MEAN, CLIP_STD)

    def __call__(self, frames):
        from torchvision.transforms import functional as TF

        size, frames = [self.image_size] * 2, [f if f.mode == "RGB" else f.convert("RGB") for f in frames]
        if self.train:
            top, left, h, w = transforms.RandomResizedCrop.get_params(frames[0], scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
            flip = bool(torch.rand(()) < 0.5)
            frames = [TF.resized_crop(f, top, left, h, w, size, InterpolationMode.BICUBIC) for f in frames]
            frames = [TF.hflip(f) for f in frames] if flip else frames
        else:
            frames = [TF.resize(f, size, InterpolationMode.BICUBIC) for f in frames]
        return torch.stack([self.normalize(TF.to_tensor(f)) for f in frames])


def pad_clip(clip, num_frames):
    """{"image": the clip padded to num_frames by repeating its last frame, "frame_mask": 1 for its real frames}.
    The model hides the padded frames from the Q-Former's cross-attention."""
    n = len(clip)
    mask = torch.zeros(num_frames, dtype=torch.long)
    mask[:n] = 1
    if n < num_frames:
        clip = torch.cat([clip, clip[-1:].expand(num_frames - n, *clip.shape[1:])])
    return {"image": clip, "frame_mask": mask}

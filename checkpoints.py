"""
This project's checkpoints: written atomically with a checksum (save_checkpoint), read back checked
(read_checkpoint), the model sizes a run takes from the checkpoint it starts from (take_model_sizes), the frozen
P-Former of a stage-0 checkpoint (pformer_from_checkpoint), and a model rebuilt from one for inference
(from_checkpoint).

A checkpoint is a dict {stage, model: the trainable weights, optimizer, step, config: the training script's config,
checksum, ...}; its config is the one source of a model's sizes once it is written.
"""
from dataclasses import fields, replace

import torch

from backbones import load_weights, read_state_dict, tensor_checksum
from metrics import write_atomic
from model import Blip2Config, Blip2Stage1, Blip2Stage2, PFormer

# The Blip2Config fields that shape the trainable weights of the visual path and the Q-Former, and the frozen image
# encoder whose features its cross-attention learned to read: a model started from a checkpoint has the checkpoint's.
MODEL_SIZES = ("vit_model", "vit_layers", "vit_kwargs", "image_size", "feature_dim", "bridge", "num_query_tokens",
               "cross_attention_freq", "hidden_size", "num_layers", "num_heads", "intermediate_size")
# Taken from the checkpoint too unless given: the same encoder weights or BERT may lie elsewhere on this machine, and
# a clip model may start from an image model (num_frames).
CHECKPOINT_DEFAULTS = ("vit_pretrained", "bert", "num_frames")


def checksum(state):
    """The checksum a checkpoint carries: of its weights and its optimizer state (backbones.tensor_checksum)."""
    return tensor_checksum({"model": state.get("model"), "optimizer": state.get("optimizer")})


def first_nonfinite_weight(state):
    """The name of the checkpoint's first weight holding a nan or an inf, or None."""
    return next((k for k, v in state.get("model", {}).items()
                 if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()), None)


def save_checkpoint(path, state):
    """torch.save(state, path) atomically (metrics.write_atomic): the file at path is either the old checkpoint or
    the complete new one, never half a file, even if the job is killed mid-write. Weights that are not finite are
    never written. The state gets a "checksum" of its weights and optimizer state, which read_checkpoint checks."""
    bad = first_nonfinite_weight(state)
    if bad is not None:
        raise RuntimeError(f"not writing {path}: weight {bad} is not finite (nan or inf)")
    state = {**state, "checksum": checksum(state)}
    write_atomic(path, lambda f: torch.save(state, f), binary=True)


def read_checkpoint(path, expect_stage=None):
    """A checkpoint of this project's train scripts, with its weights checked: a non-finite weight is an error,
    never a model that answers "<s><s><s>", and so are tensors that do not match the checkpoint's checksum."""
    state = read_state_dict(path)
    if expect_stage is not None and state.get("stage") != expect_stage:
        found = f"a stage-{state['stage']} checkpoint" if "stage" in state else "a checkpoint without a 'stage' entry"
        raise ValueError(f"{path} is {found}, expected stage {expect_stage}")
    bad = first_nonfinite_weight(state)
    if bad is not None:
        raise ValueError(f"{path} holds non-finite weights (nan or inf) in {bad}: the run that wrote it diverged")
    if "checksum" in state and state["checksum"] != checksum(state):
        raise ValueError(f"{path}: its weights or optimizer state do not match the checksum written with them (a bit "
                         f"flipped on disk or in a copy?): not loaded")
    return state


def pformer_from_checkpoint(state, source):
    """The P-Former of a stage-0 checkpoint (train_pformer.py) as read_checkpoint reads it. Every weight must be
    there, under the expected name and shape: a mismatch fails here instead of aligning to a half-random P-Former."""
    weights = {k.removeprefix("pformer."): v for k, v in state["model"].items() if k.startswith("pformer.")}
    if "llm_proj.weight" not in weights:
        raise ValueError(f"{source} is not a P-Former checkpoint: no pformer.llm_proj.weight")
    pformer = PFormer(Blip2Config.pick(state["config"]), weights["llm_proj.weight"].shape[0])
    load_weights(pformer, weights, source)
    return pformer


def take_model_sizes(config, path):
    """Fill the MODEL_SIZES and CHECKPOINT_DEFAULTS keys that a training script's config (its globals) leaves at
    None with the values of the model in the checkpoint at `path` (its saved config; path '': Blip2Config's defaults,
    the papers' sizes). A size given that contradicts the checkpoint is an error naming both values."""
    saved = read_state_dict(path, mmap=True).get("config", {}) if path else {}  # mmap: the config alone is read
    defaults = Blip2Config()
    for key in (k for k in MODEL_SIZES + CHECKPOINT_DEFAULTS if k in config):
        default = getattr(defaults, key)
        known = saved.get(key, default)
        if config[key] is None:
            config[key] = known
        elif key in MODEL_SIZES and path and config[key] != known:
            raise ValueError(f"config key {key!r} = {config[key]!r} contradicts {path}, whose model has {key} = "
                             f"{known!r}: leave {key} out to take it from there")
        if type(config[key]) is not type(default):
            raise ValueError(f"config key {key!r} expects {type(default).__name__}, got {config[key]!r}")
    return config


def from_checkpoint(path, device="cpu", overrides=None):
    """A stage-1 (retrieval) or stage-2 (captioning, VQA) model of this project for inference: rebuilt from the
    config saved in its checkpoint (with `overrides`, e.g. {"llm_model": "/models/opt-2.7b"}; not its sizes), its
    trainable weights loaded, in eval mode on `device`. Off CUDA the frozen parts are float32 (half-precision weights
    are for GPUs)."""
    state = read_checkpoint(path)
    if state.get("stage") not in (1, 2) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a stage-1 or stage-2 checkpoint (stage={state.get('stage')!r})")
    overrides = overrides or {}
    unknown = sorted(set(overrides) - {f.name for f in fields(Blip2Config)})
    if unknown:
        raise ValueError(f"model overrides: {', '.join(unknown)} not fields of model.Blip2Config")
    for key in MODEL_SIZES + ("embed_dim", "vocab_size"):
        if key in overrides and key in state["config"] and overrides[key] != state["config"][key]:
            raise ValueError(f"model override {key} = {overrides[key]!r} contradicts {path}, whose model has {key} = "
                             f"{state['config'][key]!r}")
    config = Blip2Config.pick({**state["config"], **overrides})
    if not str(device).startswith("cuda"):
        config = replace(config, vit_dtype="float32", llm_dtype="float32")
    weights = state["model"]
    if state["stage"] == 1:
        model = Blip2Stage1(config)
        # a stage 1 aligned to a P-Former also trained llm_proj (for stage 2); retrieval has no use for it
        weights = {k: v for k, v in weights.items() if not k.startswith("llm_proj.")}
    else:  # the P-Former of a P-Former run was a training-time teacher only: generation never reads it
        model = Blip2Stage2(config)
    # a clip model (num_frames > 1 in overrides) may start from an image checkpoint
    load_weights(model, weights, path, required=model.required_weights(), trainable_only=True)
    return model.to(device).eval()

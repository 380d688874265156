"""Tests for configurator.py and train_common.py (CPU only; the 2-process test uses gloo)."""
import json
import math
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import distributed
import train_common as tc
from backbones import load_weights
from checkpoints import read_checkpoint
from configurator import apply_overrides, config_snapshot
from metrics import write_atomic, write_json

# -----------------------------------------------------------------------------
# configurator


def make_config():
    return {'lr': 1e-4, 'batch_size': 32, 'compile': True, 'out_dir': 'out', 'init_from': None,
            'betas': (0.9, 0.98), 'os': os, '_private': 1}


def test_config_file_then_args(tmp_path):
    cfg_file = tmp_path / 'stage1.py'
    cfg_file.write_text("import math\nbatch_size = 64\nout_dir = 'out/s1'\n_scratch = 5\nlr = 2 * math.pi\n")
    config = make_config()
    out = apply_overrides(config, [str(cfg_file), '--batch_size=128', '--betas=(0.9,0.95)', '--init_from=resume'])
    assert out is config
    assert config['batch_size'] == 128  # the later argument wins
    assert config['out_dir'] == 'out/s1' and config['lr'] == 2 * math.pi
    assert config['betas'] == (0.9, 0.95) and config['init_from'] == 'resume'  # a bare string falls back
    assert config['_private'] == 1 and config['os'] is os


def test_config_int_for_float_and_none_default():
    config = apply_overrides(make_config(), ['--lr=1', '--init_from=3'])
    assert config['lr'] == 1.0 and type(config['lr']) is float
    assert config['init_from'] == 3


@pytest.mark.parametrize('arg,given', [('--batch_size=0.5', 'float'), ('--compile=1', 'int'),
                                       ('--batch_size=True', 'bool'), ('--lr=fast', 'str')])
def test_config_wrong_type(arg, given):
    key = arg[2:].split('=')[0]
    with pytest.raises(ValueError) as e:
        apply_overrides(make_config(), [arg])
    msg = str(e.value)
    assert key in msg and given in msg and '\n' not in msg


def test_config_unknown_key_suggests():
    with pytest.raises(ValueError, match="'batchsize'.*did you mean 'batch_size'"):
        apply_overrides(make_config(), ['--batchsize=4'])
    with pytest.raises(ValueError, match="unknown config key 'os'"):  # modules are not config
        apply_overrides(make_config(), ['--os=1'])
    with pytest.raises(ValueError, match='expected'):
        apply_overrides(make_config(), ['batch_size=4'])


def test_config_unknown_key_in_file(tmp_path):
    cfg_file = tmp_path / 'bad.py'
    cfg_file.write_text('batch_size = 8\nwarmup = 100\n')
    with pytest.raises(ValueError) as e:
        apply_overrides(make_config(), [str(cfg_file)])
    assert str(cfg_file) in str(e.value) and "'warmup'" in str(e.value)


def test_config_snapshot():
    snap = config_snapshot(make_config())
    assert set(snap) == {'lr', 'batch_size', 'compile', 'out_dir', 'init_from', 'betas'}

# -----------------------------------------------------------------------------
# lr schedule


def test_cosine_lr():
    kw = dict(warmup_steps=100, max_steps=1000, lr=1e-4, min_lr=1e-5, warmup_start_lr=1e-6)
    assert tc.cosine_lr(0, **kw) == pytest.approx(1e-6)
    assert tc.cosine_lr(50, **kw) == pytest.approx((1e-6 + 1e-4) / 2)
    assert tc.cosine_lr(100, **kw) == pytest.approx(1e-4)
    assert tc.cosine_lr(550, **kw) == pytest.approx((1e-4 + 1e-5) / 2)
    assert tc.cosine_lr(1000, **kw) == pytest.approx(1e-5)
    assert tc.cosine_lr(5000, **kw) == pytest.approx(1e-5)
    warm = [tc.cosine_lr(s, **kw) for s in range(0, 101)]
    decay = [tc.cosine_lr(s, **kw) for s in range(100, 1001)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert max(tc.cosine_lr(s, **kw) for s in range(2000)) == pytest.approx(1e-4)


def test_epoch_cosine_lr_is_lavis_schedule():
    """lr_schedule='epoch', as LAVIS's LinearWarmupCosineLRScheduler in the official video runs: warmup in epoch 0,
    then one value per epoch; 10 epochs of 2030 steps (VATEX at batch 128) end at about 1.22e-5, not min_lr."""
    cfg = dict(lr_schedule="epoch", warmup_steps=1000, lr=1e-4, min_lr=1e-5, warmup_start_lr=1e-6,
               lr_decay_steps=20_300, grad_accum=1)
    lr = [tc.learning_rate(s, cfg, batches_per_epoch=2030) for s in range(20_300)]
    assert lr[0] == pytest.approx(1e-6) and lr[500] == pytest.approx((1e-6 + 1e-4) / 2)
    assert lr[1000] == lr[2029] == pytest.approx(1e-4)
    assert len(set(lr[2030:4060])) == 1 and lr[2030] == pytest.approx(1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi / 10)))
    assert lr[-1] == pytest.approx(1.2202e-5, rel=1e-4)
    assert tc.learning_rate(20_300, {**cfg, "lr_schedule": "step"}) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="lr_schedule"):
        tc.check_config(dict(batch_size=1, grad_accum=1, max_steps=1, lr_decay_steps=1, log_interval=1,
                             eval_interval=1, ckpt_interval=1, warmup_steps=0, eval_batches=0, grad_clip=0,
                             weight_decay=0, lr=1, min_lr=0, warmup_start_lr=0, dtype="float32", betas=(0.9, 0.999),
                             init_from="scratch", lr_schedule="linear"))

# -----------------------------------------------------------------------------
# optimizer


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.emb = nn.Embedding(10, 4)
        self.query_tokens = nn.Parameter(torch.zeros(1, 3, 4))
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.rel_bias = nn.Parameter(torch.zeros(2, 2))  # 2-D but a bias
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_optimizer_groups(capsys):
    model = Toy()
    opt = tc.make_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.98), device='cpu')
    decay_of = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
    wd = {n: decay_of.get(id(p)) for n, p in model.named_parameters()}
    assert wd == {'proj.weight': 0.05, 'proj.bias': 0.0, 'ln.weight': 0.0, 'ln.bias': 0.0, 'emb.weight': 0.05,
                  'query_tokens': 0.05, 'temp': 0.0, 'rel_bias': 0.0,
                  'frozen.weight': None, 'frozen.bias': None}  # None: not in the optimizer at all
    assert opt.defaults['betas'] == (0.9, 0.98) and opt.defaults['lr'] == 1e-4 and not opt.defaults['fused']
    assert '3 decayed tensors (84 parameters), 5 non-decayed tensors (29 parameters)' in capsys.readouterr().out

# -----------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip(tmp_path):
    path = str(tmp_path / 'sub' / 'ckpt.pt')
    state = {'stage': 1, 'step': 7, 'model': {'w': torch.arange(6.).view(2, 3)}, 'config': {'lr': 1e-4}}
    tc.save_checkpoint(path, state)
    loaded = read_checkpoint(path, expect_stage=1)
    assert loaded['step'] == 7 and loaded['config'] == {'lr': 1e-4}
    assert torch.equal(loaded['model']['w'], state['model']['w'])
    assert os.listdir(tmp_path / 'sub') == ['ckpt.pt']


def test_checkpoint_crash_midway_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    tc.save_checkpoint(str(path), {'stage': 1, 'step': 1})
    before = path.read_bytes()

    def crashing_save(obj, f):
        f.write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crashing_save)
    with pytest.raises(OSError, match='disk full'):
        tc.save_checkpoint(str(path), {'stage': 1, 'step': 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_an_atomic_write_that_fails_midway_keeps_the_old_file(tmp_path):
    """json.dump and torch.save write part of the file before they meet what they cannot serialise."""
    path = str(tmp_path / 'result.json')
    write_json(path, {'accuracy': 1})
    with pytest.raises(TypeError, match='object'):
        write_json(path, {'accuracy': 2, 'bad': object()})
    assert json.load(open(path)) == {'accuracy': 1}
    with pytest.raises(Exception, match='lambda'):
        write_atomic(path, lambda f: torch.save({'w': torch.ones(1000), 'bad': lambda: 0}, f), binary=True)
    assert json.load(open(path)) == {'accuracy': 1} and os.listdir(tmp_path) == ['result.json']
    write_atomic(path, lambda f: f.write('text\n'))
    assert open(path).read() == 'text\n' and os.listdir(tmp_path) == ['result.json']


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pt'):
        read_checkpoint(str(tmp_path / 'nope.pt'))
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'\x00not a checkpoint' * 10)
    with pytest.raises(ValueError, match='garbage.pt'):
        read_checkpoint(str(garbage))
    good = tmp_path / 'good.pt'
    tc.save_checkpoint(str(good), {'stage': 2, 'w': torch.randn(1000)})
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ValueError, match='truncated.pt'):
        read_checkpoint(str(truncated))
    with pytest.raises(ValueError) as e:
        read_checkpoint(str(good), expect_stage=1)
    assert str(e.value) == f'{good} is a stage-2 checkpoint, expected stage 1'


def test_trainable_state_dict():
    model = Toy()
    sd = tc.trainable_state_dict(model)
    assert 'frozen.weight' not in sd and 'frozen.bias' not in sd and 'proj.weight' in sd

    other = Toy()
    load_weights(other, {k: v.clone() for k, v in sd.items()}, 'ckpt.pt', trainable_only=True)
    assert all(torch.equal(p, sd[n]) for n, p in other.named_parameters() if n in sd)

    missing = {k: v for k, v in sd.items() if k != 'ln.bias'}
    with pytest.raises(ValueError, match=r'ckpt\.pt.*missing \(1\): ln\.bias'):
        load_weights(other, missing, 'ckpt.pt', trainable_only=True)
    extra = dict(sd, **{'frozen.weight': torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=r'unexpected \(1\): frozen\.weight'):
        load_weights(other, extra, 'ckpt.pt', trainable_only=True)
    wrong = dict(sd, **{'proj.weight': torch.zeros(8, 5)})
    with pytest.raises(ValueError, match=r'shape mismatch \(1\): proj\.weight \(8, 5\) vs model \(8, 4\)'):
        load_weights(other, wrong, 'ckpt.pt', trainable_only=True)

# -----------------------------------------------------------------------------
# precision, logging, mfu, data


def test_precision_helpers():
    assert not isinstance(tc.autocast_context('cpu', 'bfloat16'), torch.autocast)
    assert not isinstance(tc.autocast_context('cuda', 'float32'), torch.autocast)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # no CUDA here
        ctx = tc.autocast_context('cuda:0', 'bfloat16')
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not tc.make_grad_scaler('cpu', 'float16').is_enabled()
    with pytest.raises(KeyError):
        tc.autocast_context('cpu', 'fp16')


def test_logger(tmp_path, capsys):
    log = tc.Logger(str(tmp_path), master=True)
    log.log(120, {'loss': torch.tensor(2.3125), 'itc': 0.93, 'lr': 1.2e-5, 'samples_per_sec': 512.34,
                  'mfu': 0.3121, 'epoch': 1, 'grad_norm': None})
    assert capsys.readouterr().out.strip() == \
        'step 120 | loss 2.312 | itc 0.93 | lr 1.2e-05 | 512.3 samples/s | mfu 31.2% | epoch 1'
    line = json.loads((tmp_path / 'log.jsonl').read_text())
    assert line['step'] == 120 and line['loss'] == 2.3125 and line['grad_norm'] is None
    tc.Logger(str(tmp_path / 'other'), master=False).log(1, {'loss': 1.0})
    assert capsys.readouterr().out == '' and not (tmp_path / 'other').exists()


def test_mfu(monkeypatch):
    """The peak of the GPU in use: SXM, PCIe and NVL parts differ, and a MIG slice has a share of the SMs."""
    from types import SimpleNamespace

    assert tc.mfu(1e12, 100.0, 'cpu') is None
    for name, sms, expected in [('NVIDIA H100 80GB HBM3', 132, 100e12 / 989e12),
                                ('NVIDIA H100 PCIe', 114, 100e12 / 756e12),
                                ('NVIDIA H100 NVL', 132, 100e12 / 835e12),
                                ('NVIDIA H200 NVL', 132, 100e12 / 835e12),
                                ('NVIDIA H200', 132, 100e12 / 989e12),
                                ('NVIDIA H100 80GB HBM3 MIG 3g.40gb', 60, 100e12 / (989e12 * 60 / 132)),
                                ('NVIDIA A100-SXM4-40GB', 108, 100e12 / 312e12), ('Some Future GPU', 100, None)]:
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None, name=name: name)
        monkeypatch.setattr(torch.cuda, 'get_device_properties',
                            lambda device=None, sms=sms: SimpleNamespace(multi_processor_count=sms))
        assert tc.mfu(1e12, 100.0, 'cuda:0') == (pytest.approx(expected) if expected else None), name


class RecordingSampler(torch.utils.data.Sampler):
    def __init__(self, n):
        self.n, self.start, self.calls = n, 0, []

    def set_epoch(self, epoch):
        self.calls.append(('epoch', epoch))

    def set_start(self, index):
        self.calls.append(('start', index))
        self.start = index

    def __iter__(self):
        return iter(range(self.start, self.n))

    def __len__(self):
        return self.n - self.start


def test_infinite_batches():
    sampler = RecordingSampler(4)
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, sampler=sampler)
    batches = tc.infinite_batches(loader, start_epoch=3, start_index=2)
    got = [(epoch, batch.tolist()) for epoch, batch in (next(batches) for _ in range(4))]
    assert got == [(3, [2, 3]), (4, [0, 1]), (4, [2, 3]), (5, [0, 1])]
    assert sampler.calls == [('epoch', 3), ('start', 2), ('epoch', 4), ('start', 0), ('epoch', 5), ('start', 0)]


class CountingStream(torch.utils.data.IterableDataset):
    def __init__(self):
        self.epoch, self.skipped = 0, []

    def set_epoch(self, epoch):
        self.epoch = epoch

    def skip(self, n):
        self.skipped.append((self.epoch, n))

    def __iter__(self):
        return iter(range(100 * self.epoch, 100 * self.epoch + 50))


def test_infinite_batches_fixed_steps_per_epoch():
    stream = CountingStream()
    loader = torch.utils.data.DataLoader(stream, batch_size=2)
    batches = tc.infinite_batches(loader, start_epoch=1, start_index=4, steps_per_epoch=2)
    got = [(epoch, batch.tolist()) for epoch, batch in (next(batches) for _ in range(5))]
    assert got == [(1, [100, 101]), (1, [102, 103]), (2, [200, 201]), (2, [202, 203]), (3, [300, 301])]
    assert stream.skipped == [(1, 4), (2, 0), (3, 0)]

# -----------------------------------------------------------------------------
# distributed


def test_single_process():
    assert 'RANK' not in os.environ
    d = distributed.setup_distributed('cpu')
    assert d == distributed.Dist(ddp=False, rank=0, local_rank=0, world_size=1, device='cpu', master=True)
    x = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_mean(x) is x and distributed.is_master()


def _worker(rank, world_size, port):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    d = distributed.setup_distributed('cpu')
    try:
        assert d == distributed.Dist(ddp=True, rank=rank, local_rank=rank, world_size=world_size, device='cpu',
                                     master=rank == 0)
        assert distributed.is_master() == (rank == 0)
        x = torch.tensor([float(rank), 10.0 * rank])
        mean = distributed.all_reduce_mean(x)
        assert torch.allclose(mean, torch.tensor([0.5, 5.0])), mean
        assert x.tolist() == [float(rank), 10.0 * rank]  # the input is left alone
        model = torch.nn.parallel.DistributedDataParallel(Toy())
        assert set(tc.trainable_state_dict(model)) == set(tc.trainable_state_dict(Toy()))  # no module. prefix
    finally:
        distributed.cleanup_distributed()


@pytest.mark.slow
def test_two_process_gloo():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port), nprocs=2, join=True)


def test_log_keeps_one_run_after_a_restart(tmp_path):
    """An interrupted run logged past its last checkpoint: resuming from step 3 drops steps 4 and 5, a run from
    scratch in the same out_dir starts an empty log (else the loss curves would double back)."""
    logger = tc.Logger(str(tmp_path), master=True)
    for step in range(1, 6):
        logger.log(step, {'loss': torch.tensor(float(step))})
    logger.log(5, {'val_loss': 0.5})
    path = tmp_path / 'log.jsonl'
    logger.keep_until(3)
    assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2, 3]
    logger.log(4, {'loss': 9.0})
    assert [json.loads(line)['loss'] for line in path.read_text().splitlines()] == [1.0, 2.0, 3.0, 9.0]
    logger.keep_until(0)
    assert path.read_text() == ''
    tc.Logger(str(tmp_path / 'other'), master=True).keep_until(0)  # no log yet: nothing to do

# -----------------------------------------------------------------------------
# the training loop's log lines, and what a checkpoint records


def toy_training(tmp_path, monkeypatch, **changes):
    """train_common.train on a linear model and a list of vectors, on a fake clock on which every forward (a
    training micro-step or a validation batch) takes one second. Returns the log lines and the checkpoint."""
    import time as real_time
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(tc, 'time', SimpleNamespace(perf_counter=lambda: clock[0], time=real_time.time,
                                                    strftime=real_time.strftime))

    def loss_fn(model, batch):
        clock[0] += 1.0
        return {'loss': model(batch['x']).pow(2).mean()}  # B x 1
    samples = [{'x': torch.randn(4, generator=torch.Generator().manual_seed(i)), 'text': 'a'} for i in range(64)]
    loader = torch.utils.data.DataLoader(samples, batch_size=2)
    cfg = dict(seed=0, out_dir=str(tmp_path), init_from='scratch', overwrite=False, batch_size=2, grad_accum=2,
               max_steps=5, log_interval=2, eval_interval=3, eval_batches=2, ckpt_interval=100, lr=1e-3, min_lr=0.0,
               warmup_steps=0, warmup_start_lr=0.0, lr_decay_steps=5, weight_decay=0.0, betas=(0.9, 0.95),
               grad_clip=1.0, dtype='float32', compile=False, num_workers=0, wandb_log=False, wandb_project='',
               wandb_run_name='')
    cfg.update(changes)
    single = distributed.Dist(ddp=False, rank=0, local_rank=0, world_size=1, device='cpu', master=True)
    tc.train(model=nn.Linear(4, 1), loss_fn=loss_fn, loader=loader, val_loader=loader, cfg=cfg, dist_info=single,
             stage=1)
    rows = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    return rows, read_checkpoint(str(tmp_path / 'ckpt.pt'))


def test_each_log_line_counts_its_own_steps_and_time(tmp_path, monkeypatch):
    """max_steps=5, log_interval=2: the lines at steps 2, 4 and 5 cover 2, 2 and 1 steps of 2 micro-steps of 2
    samples, and each divides its own samples by its own training time (validation at steps 3 and 5 left out), so
    at one second per micro-step every line reads 2 samples/s; the last is not a full interval's samples over one
    step's time, nor the line after a validation the interval's samples over the time since it."""
    rows, _ = toy_training(tmp_path, monkeypatch)
    train = [r for r in rows if 'loss' in r]
    assert [(r['step'], r['samples']) for r in train] == [(2, 8), (4, 8), (5, 4)]
    assert [r['samples_per_sec'] for r in train] == [2.0, 2.0, 2.0]
    assert [r['step'] for r in rows if 'val_loss' in r] == [3, 5]


def test_checkpoint_records_what_wrote_it(tmp_path, monkeypatch):
    import metrics

    _, state = toy_training(tmp_path, monkeypatch, max_steps=2, eval_batches=0)
    assert state['provenance'] == metrics.provenance('cpu')
    assert state['provenance']['commit'] == metrics.CODE_COMMIT != ''
    assert state['provenance']['torch_threads'] == torch.get_num_threads()

"""fasttricks inside the frameworks people train with, each run beside the
same script with torch.optim as the control: Lightning (bf16-mixed with
gradient clipping, resume, its SWA and EMA callbacks), the HF Trainer (resume
from a checkpoint), accelerate (an fp16 overflow skips the step and holds the
LR schedule; save/load). Tiny models, random data, one CPU process. The
averages of our samplers ride in every framework's checkpoint as optimizer
state (NOTE [state-resident extras])."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fasttricks.optim as fo
from fasttricks.sampling import EMA


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    yield
    torch.set_num_threads(threads)


def data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, :4].sum(1) > 0).long())


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def assert_params(a, b, exact=True):
    for p, q in zip(a, b):
        if exact:
            assert torch.equal(p.detach(), q.detach())
        else:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)


# ---- Lightning ------------------------------------------------------------------

def lightning():
    return pytest.importorskip("lightning.pytorch")


def lit_module(make_opt, sampler=None):
    pl = lightning()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()
            self.sampler = None

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = make_opt(self.parameters())
            if sampler is not None:
                self.sampler = sampler(opt)
            return opt

        def train_dataloader(self):
            return torch.utils.data.DataLoader(data(), batch_size=8)

    return Module()


def trainer(tmp_path, **kw):
    pl = lightning()
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_lightning_clips_gradients_under_mixed_precision(tmp_path, precision):
    """Lightning refuses clipping for optimizers that unscale inside their step;
    ours, like torch's non-fused ones, do not by default."""
    runs = {}
    for name, make in (("ours", lambda ps: fo.AdamW(ps, lr=1e-2)), ("torch", lambda ps: torch.optim.AdamW(ps, lr=1e-2))):
        module = lit_module(make)
        trainer(tmp_path, max_epochs=2, precision=precision, gradient_clip_val=0.05).fit(module)
        runs[name] = list(module.parameters())
    assert_params(runs["ours"], runs["torch"], exact=False)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_lightning_configure_gradient_clipping_with_our_fused_clip(tmp_path, precision):
    """configure_gradient_clipping calls opt.clip_grad_norm_ (the clip folded
    into the step, NOTE [clip in the step]): the same run as Lightning's own
    gradient_clip_val with torch.optim.AdamW."""
    pl = lightning()
    runs = {}
    for name in ("ours", "torch"):
        module = lit_module((lambda ps: fo.AdamW(ps, lr=1e-2)) if name == "ours"
                            else (lambda ps: torch.optim.AdamW(ps, lr=1e-2)))
        if name == "ours":
            def configure_gradient_clipping(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
                optimizer.clip_grad_norm_(0.05)

            module.configure_gradient_clipping = configure_gradient_clipping
        kw = {} if name == "ours" else {"gradient_clip_val": 0.05}
        trainer(tmp_path, max_epochs=2, precision=precision, **kw).fit(module)
        runs[name] = list(module.parameters())
    assert pl is not None
    assert_params(runs["ours"], runs["torch"], exact=False)


def test_lightning_16_mixed_plugin_clips_with_ours():
    pl = lightning()
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    model = net()
    opt = fo.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    plugin.clip_gradients(opt, clip_val=0.1)  # raised "does not allow for gradient clipping" before
    assert pl is not None and torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) <= 0.1 + 1e-6
    with pytest.raises(RuntimeError, match="unscaling"):  # torch's fused opt-in: as torch.optim.AdamW(fused=True)
        plugin.clip_gradients(fo.AdamW(model.parameters(), fused=True), clip_val=0.1)


def test_lightning_resume_carries_our_sampler(tmp_path):
    make = lambda ps: fo.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
    sampler = lambda opt: EMA(opt, decay=0.8)  # noqa: E731
    whole = lit_module(make, sampler)
    trainer(tmp_path / "a", max_epochs=2).fit(whole)
    first = lit_module(make, sampler)
    t = trainer(tmp_path / "b", max_epochs=1)
    t.fit(first)
    t.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = lit_module(make, sampler)
    trainer(tmp_path / "c", max_epochs=2).fit(resumed, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert_params(resumed.parameters(), whole.parameters())
    assert resumed.sampler.total_steps == whole.sampler.total_steps == 8
    assert_params(resumed.sampler.averages, whole.sampler.averages)


@pytest.mark.parametrize("callback", ["swa", "ema"])
def test_lightning_weight_averaging_callbacks(tmp_path, callback):
    pl = lightning()
    runs = {}
    for name, make in (("ours", lambda ps: fo.SGD(ps, lr=0.1, momentum=0.9)),
                       ("torch", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))):
        module = lit_module(make)
        cb = (pl.callbacks.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1) if callback == "swa"
              else pl.callbacks.EMAWeightAveraging(decay=0.9))
        trainer(tmp_path / name, max_epochs=3, callbacks=[cb]).fit(module)
        runs[name] = list(module.parameters())
    assert_params(runs["ours"], runs["torch"], exact=False)


# ---- HF Trainer ---------------------------------------------------------------------


class HFNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = net()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class HFData(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = data(48).tensors

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def hf_run(tmp_path, make, max_steps, resume=None, sampler=None, stop_at=None, bf16=False):
    transformers = pytest.importorskip("transformers")

    class StopAt(transformers.TrainerCallback):  # an interrupted run: the schedule of max_steps, cut short
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == stop_at

    model = HFNet()
    opt = make(model.parameters())
    s = sampler(opt) if sampler else None
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, save_steps=3,
                                          per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
                                          use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0,
                                          dataloader_num_workers=0, bf16=bf16)
    t = transformers.Trainer(model=model, args=args, train_dataset=HFData(), optimizers=(opt, None),
                             callbacks=[StopAt()] if stop_at else None)
    t.train(resume_from_checkpoint=resume)
    return model, s


def test_hf_trainer_resume_matches_the_uninterrupted_run(tmp_path):
    make = lambda ps: fo.AdamW(ps, lr=1e-2)  # noqa: E731
    sampler = lambda opt: EMA(opt, decay=0.9)  # noqa: E731
    whole, ema = hf_run(tmp_path / "whole", make, 6, sampler=sampler)
    hf_run(tmp_path / "part", make, 6, sampler=sampler, stop_at=3)
    resumed, ema2 = hf_run(tmp_path / "part", make, 6, resume=str(tmp_path / "part" / "checkpoint-3"),
                           sampler=sampler)
    assert_params(resumed.parameters(), whole.parameters())
    assert ema2.total_steps == 6 and all(torch.equal(a, b) for a, b in zip(ema.averages, ema2.averages))
    control, _ = hf_run(tmp_path / "torch", lambda ps: torch.optim.AdamW(ps, lr=1e-2), 6)
    assert_params(whole.parameters(), control.parameters(), exact=False)


def test_hf_trainer_bf16_matches_torch(tmp_path):
    ours, _ = hf_run(tmp_path / "ours", lambda ps: fo.AdamW(ps, lr=1e-2), 6, bf16=True)
    control, _ = hf_run(tmp_path / "torch", lambda ps: torch.optim.AdamW(ps, lr=1e-2), 6, bf16=True)
    assert_params(ours.parameters(), control.parameters(), exact=False)


# ---- accelerate --------------------------------------------------------------------


@pytest.mark.parametrize("control", [False, True], ids=["fasttricks", "torch.optim"])
def test_accelerate_sees_an_fp16_overflow(tmp_path, control):
    """accelerate's fp16 path on a GPU: a GradScaler that skips the step on an
    overflow; accelerate reports it (step_was_skipped) and holds the LR
    schedule. (CPU accelerate makes no scaler for fp16: the test gives it one.)"""
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model = net()
    opt = (torch.optim.AdamW if control else fo.AdamW)(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    model, opt, sched = acc.prepare(model, opt, sched)
    x, y = data(8).tensors
    skipped, lrs = [], []
    for i in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * (float("inf") if i == 1 else 1.0)
        acc.backward(loss)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        sched.step()
        skipped.append(opt.step_was_skipped)
        lrs.append(opt.param_groups[0]["lr"])
        if i == 1:
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert skipped == [False, True, False]
    assert lrs == pytest.approx([1e-2 / 2, 1e-2 / 2, 1e-2 / 3])  # the skipped step held the schedule


def test_accelerate_save_and_load_state_carry_our_sampler(tmp_path):
    accelerate = pytest.importorskip("accelerate")

    def run(steps, load=None, save=None):
        acc = accelerate.Accelerator(cpu=True)
        model = net()
        opt = fo.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ema = EMA(opt, decay=0.7)
        model, opt = acc.prepare(model, opt)
        if load:
            acc.load_state(load)
        x, y = data(8).tensors
        for _ in range(steps):
            opt.zero_grad()
            acc.backward(F.cross_entropy(model(x), y))
            opt.step()
        if save:
            acc.save_state(save)
        return model, ema

    whole, ema = run(4)
    run(2, save=str(tmp_path / "state"))
    resumed, ema2 = run(2, load=str(tmp_path / "state"))
    assert_params(resumed.parameters(), whole.parameters())
    assert ema2.total_steps == 4 and all(torch.equal(a, b) for a, b in zip(ema.averages, ema2.averages))
    assert copy.deepcopy(ema2.optimizer.state_dict())["state"][0]["EMA/total_steps"] == 4


# ---- timm (where it installs: it imports torchvision, which CI cannot load beside the CPU torch) ----


def test_timm_mixup_and_loss_equal_ours_with_the_draws_pinned(monkeypatch):
    pytest.importorskip("timm")
    from timm.data import Mixup as TimmMixup
    from timm.loss import SoftTargetCrossEntropy

    from fasttricks.mixup import Mixup

    lam = 0.3
    monkeypatch.setattr(TimmMixup, "_params_per_batch", lambda self: (lam, False))
    monkeypatch.setattr(Mixup, "_draw", lambda self, n: (torch.full((n,), lam, dtype=torch.float64),
                                                          torch.zeros(n, dtype=torch.bool)))
    kw = dict(mixup_alpha=0.8, label_smoothing=0.1, num_classes=10)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,))
    x_timm, t_timm = TimmMixup(**kw)(x.clone(), y)
    x_ours, t_ours = Mixup(**kw)(x.clone(), y)
    torch.testing.assert_close(x_ours, x_timm)
    torch.testing.assert_close(t_ours.dense(), t_timm)
    logits = torch.randn(8, 10)
    torch.testing.assert_close(SoftTargetCrossEntropy()(logits, t_ours), SoftTargetCrossEntropy()(logits, t_timm))


def test_timm_scheduler_and_model_ema_with_our_optimizer():
    pytest.importorskip("timm")
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    runs = {}
    for name, cls in (("ours", fo.AdamW), ("torch", torch.optim.AdamW)):
        model = net()
        opt = cls(model.parameters(), lr=1e-2)
        sched = CosineLRScheduler(opt, t_initial=6, warmup_t=2, warmup_lr_init=1e-4)
        ema = ModelEmaV3(model, decay=0.9)
        x, y = data(16).tensors
        lrs = []
        for epoch in range(6):
            sched.step(epoch)
            lrs.append(opt.param_groups[0]["lr"])
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            ema.update(model)
        runs[name] = (lrs, list(ema.module.parameters()))
    assert runs["ours"][0] == runs["torch"][0]
    assert_params(runs["ours"][1], runs["torch"][1], exact=False)

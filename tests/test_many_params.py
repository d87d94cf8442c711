"""NOTE [tiny tensors]: from kParallelTensors (2048) tensors on, a step's per-param
host work (the gather, the step counters, the kernels' records) and its kernels
run on all threads. The step must still be torch's, param for param, and a bad
grad anywhere must still stop it before anything is written."""
import pytest
import torch

import fasttricks.optim as fo
from helpers import BACKENDS, assert_agree, max_err, twins

N = 2500  # above kParallelTensors, so both threads of CI's machine take a share
# The cpu backend's plans are what the split serves. (The device plans gather
# through the same C++ table, but 2500 tensors take minutes under Triton's
# interpreter.)
CASES = [(fo.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
         (fo.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
         (fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4))]
pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")


def shapes():
    # Mostly one-element params, as a model's biases and norms, with a few
    # larger ones between them.
    return [(3, 5) if i % 97 == 0 else (1,) for i in range(N)]


def set_grads(ours, theirs, seed):
    g = torch.Generator().manual_seed(seed)
    for i, (p, q) in enumerate(zip(ours, theirs)):
        if (i + seed) % 13 == 0:  # some params sit a step out
            p.grad = q.grad = None
            continue
        grad = torch.randn(p.shape, generator=g)
        if p.dim() == 2 and seed % 2:
            # A grad laid out unlike its param: this param takes the full check
            # and a contiguous temporary, between params on the fast path.
            grad = grad.t().contiguous().t()
        p.grad, q.grad = grad, grad.clone()


@pytest.mark.parametrize("cls,tcls,cfg", CASES, ids=["Adam-amsgrad", "AdamW", "SGD-nesterov"])
def test_many_params_step_as_torch(cls, tcls, cfg):
    ours, opt, theirs, topt = twins(cls, tcls, cfg, "cpu", shapes())
    for seed in range(3):
        set_grads(ours, theirs, seed)
        opt.step()
        topt.step()
    assert_agree(ours, opt, theirs, topt)


@pytest.mark.parametrize("bad", [N // 2 - 1, N - 1])  # in either thread's share
def test_a_bad_grad_among_many_changes_nothing(bad):
    ours, opt, theirs, topt = twins(fo.AdamW, torch.optim.AdamW, dict(lr=1e-2), "cpu", shapes())
    set_grads(ours, theirs, 1)
    opt.step()
    before = [p.detach().clone() for p in ours]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state_dict()["state"].items()}
    set_grads(ours, theirs, 2)
    ours[bad].grad = ours[bad].grad.to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert max_err(ours, before) == 0
    after = opt.state_dict()["state"]
    assert after.keys() == state.keys()
    for k, s in state.items():
        for n, v in s.items():
            assert torch.equal(after[k][n], v), (k, n)


def test_a_step_tensor_shared_by_many_params_counts_as_in_torch():
    # torch bumps state["step"] once per param, so a step tensor two params
    # share (a user's assignment) counts twice a step; the counters then
    # bump in order, on one thread, and must agree.
    ours, opt, theirs, topt = twins(fo.Adam, torch.optim.Adam, dict(lr=1e-2), "cpu", shapes())
    set_grads(ours, theirs, 1)
    opt.step()
    topt.step()
    opt.state[ours[5]]["step"] = opt.state[ours[4]]["step"]
    topt.state[theirs[5]]["step"] = topt.state[theirs[4]]["step"]
    for seed in (3, 5):
        set_grads(ours, theirs, seed)
        opt.step()
        topt.step()
    assert opt.state[ours[4]]["step"].item() == topt.state[theirs[4]]["step"].item()
    assert_agree(ours, opt, theirs, topt)

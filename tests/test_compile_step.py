"""NOTE [compiled step]: opt.step() inside torch.compile: no graph break, the
same result as eager, and no recompile when a tensor lr changes."""
import pytest
import torch

import fasttricks.optim as fo
from helpers import BACKENDS

CASES = [(fo.AdamW, dict(weight_decay=0.1)), (fo.Adam, dict(amsgrad=True)),
         (fo.SGD, dict(momentum=0.9, nesterov=True))]
IDS = ["AdamW", "Adam-amsgrad", "SGD-nesterov"]


def setup(cls, kw, backend, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = cls(model.parameters(), lr=torch.tensor(0.01), backend=backend, **kw)
    return model, opt


def grads(model, seed):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    model(x).square().mean().backward()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "reference")])
@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_compiled_step_has_no_graph_break_and_matches_eager(cls, kw, backend):
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        model, opt = setup(cls, kw, backend)
        step = torch.compile(opt.step, backend="aot_eager", fullgraph=True) if compiled else opt.step
        for k in range(4):
            grads(model, k)
            step()
            opt.param_groups[0]["lr"].mul_(0.5)  # a schedule, in place: no recompile
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_explain_counts_no_break_and_lr_changes_do_not_recompile(cls, kw):
    torch._dynamo.reset()
    model, opt = setup(cls, kw, "auto")
    grads(model, 0)
    opt.step()  # state and plans exist, as after a first eager step
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    counts = []

    def counting_backend(gm, inputs):
        counts.append(1)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(opt.step, backend=counting_backend)
    for k in range(3):
        grads(model, k)
        step()
        opt.param_groups[0]["lr"].mul_(0.5)
    assert len(counts) == 1


def test_the_step_op_stays_out_of_cuda_graphs():
    """Under torch.compile(mode="reduce-overhead") a captured graph replays
    without running Python, and the op reads the lr from param_groups when it
    runs: it carries the cudagraph_unsafe tag, so the compiler keeps it out of
    the captured graphs and a changing lr is read at every step."""
    import fasttricks.optim._compiled  # noqa: F401  (registers the op)

    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip("this torch has no cudagraph_unsafe tag")
    assert torch.Tag.cudagraph_unsafe in torch.ops.fasttricks.optimizer_step.default.tags

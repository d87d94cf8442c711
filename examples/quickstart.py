"""A small training loop with fasttricks.optim.AdamW next to torch.optim.AdamW
on synthetic data: the drop-in swap in a dozen lines. For the full tour on real
data, run `fasttricks demo`. Run: python examples/quickstart.py"""
import time

import torch

import fasttricks
from fasttricks import optim as fo


def train(opt_cls, seed=0, steps=200, **kw):
    torch.manual_seed(seed)
    x = torch.randn(2048, 32)
    y = (x @ torch.randn(32, 1)).squeeze(1).gt(0).long()
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 2))
    opt = opt_cls(model.parameters(), lr=1e-2, weight_decay=1e-2, **kw)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, 2048, (128,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (model(x).argmax(1) == y).float().mean().item()
    return loss.item(), acc, time.perf_counter() - t0


if __name__ == "__main__":
    for name, info in fasttricks.backends().items():
        print(f"backend {name:9s} {'yes' if info['available'] else 'no ':3s} {info['detail']}")
    for label, cls, kw in [("fasttricks AdamW", fo.AdamW, {}), ("torch AdamW (fused)", torch.optim.AdamW, {"fused": True})]:
        loss, acc, secs = train(cls, **kw)
        print(f"{label:22s} final loss {loss:.4f}  train accuracy {acc:.3f}  {secs:.2f}s")

"""Periodic weight sampling and averaging (docs/sampling.md): PSWA, PWALKS,
PSWM (Tripathi & Shah), SWA, EMA and the BachEpoch / BachBatch baselines, fused into
the fasttricks optimizers' step or attached to any torch optimizer.

    opt = fasttricks.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pwalks = fasttricks.sampling.PWALKS(opt, steps_per_epoch=len(loader), k=0.05)
    for epoch in range(epochs):
        for x, y in loader:
            ...; opt.step()
        pwalks.end_epoch(model=model, bn_loader=loader, bn_fraction=0.1)
"""
from fasttricks.sampling._base import WeightSampler
from fasttricks.sampling.bn import recalibrate_bn
from fasttricks.sampling.methods import EMA, PSWA, PSWM, PWALKS, SWA, BachBatch, BachEpoch

__all__ = ["WeightSampler", "PSWA", "PWALKS", "PSWM", "SWA", "EMA", "BachEpoch", "BachBatch", "recalibrate_bn"]

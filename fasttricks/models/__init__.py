"""Models of the seeds, torchvision-free: ResNet-18/34/50 with the B/C/D tweaks."""
from fasttricks.models.resnet import VARIANTS, BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "VARIANTS"]

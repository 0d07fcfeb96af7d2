"""Re-parameterizable convnets written the way their papers' training code is:
RepVGG (3x3+BN, 1x1+BN, BN identity), ACB (3x3, 1x3, 3x1), and MobileOne
(k over-parameterized depthwise 3x3+BN, a 1x1 scale branch, BN identity, then a
pointwise block of k 1x1+BN and BN identity). Trained a few steps so BatchNorm
running statistics are not trivial."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin, cout, k, pad, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, bias=False, groups=groups), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.k3, self.k1, self.identity = conv_bn(c, c, 3, 1), conv_bn(c, c, 1, 0), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.k3(x) + self.k1(x) + self.identity(x))


class ACBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.square, self.hor, self.ver = conv_bn(c, c, 3, 1), conv_bn(c, c, (1, 3), (0, 1)), conv_bn(c, c, (3, 1), (1, 0))

    def forward(self, x):
        return torch.relu(self.square(x) + self.hor(x) + self.ver(x))


class MobileOneBlock(nn.Module):
    def __init__(self, c, k=3):
        super().__init__()
        self.dw = nn.ModuleList(conv_bn(c, c, 3, 1, groups=c) for _ in range(k))
        self.dw_scale, self.dw_id = conv_bn(c, c, 1, 0, groups=c), nn.BatchNorm2d(c)
        self.pw = nn.ModuleList(conv_bn(c, c, 1, 0) for _ in range(k))
        self.pw_id = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(sum(b(x) for b in self.dw) + self.dw_scale(x) + self.dw_id(x))
        return torch.relu(sum(b(y) for b in self.pw) + self.pw_id(y))


class Net(nn.Module):
    def __init__(self, block, blocks=2, c=8, classes=10):  # c=32, blocks=4 in benchmarks/exact.py
        super().__init__()
        self.stem = conv_bn(3, c, 3, 1)
        self.body = nn.Sequential(*(block(c) for _ in range(blocks)))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.body(torch.relu(self.stem(x))).mean((2, 3)))


def trained(block, blocks=2, seed=0, steps=5):
    torch.manual_seed(seed)
    net = Net(block, blocks)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    net.train()
    for _ in range(steps):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def export(net, path, exporter: str):
    x = torch.randn(2, 3, 16, 16)
    if exporter == "dynamo":
        torch.onnx.export(net, (x,), dynamo=True, dynamic_shapes=({0: "batch"},)).save(str(path))
    else:  # legacy, keeping BatchNorm nodes as a training-aware export does
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}}, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False)
    return path

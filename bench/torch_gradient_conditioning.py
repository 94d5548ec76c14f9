#!/usr/bin/env python3
"""Is float32 gradient parity on cls-tiny well posed? PyTorch's own answer, without mdeq.

Runs the official classification head (written out here from docs/reference.md §2.1: incre bottlenecks,
downsamp, final layer, pool, classifier; BatchNorm in train mode as in the fixture's train path)
in PyTorch on the fixture's float64 equilibrium (io_f64 train.zstar, which is f(z*) to 1e-14),
once in float64 and then in float32 at that point rounded to float32 and moved by random ±k ulp
per element. It counts how often ∂L/∂f(z*) moves by more than 1e-4 (a tenth of the grad.*
tolerance) and lists the final-layer pre-activations nearest the ReLU kink.

    python3 bench/torch_gradient_conditioning.py [fixtures/cls-tiny] [trials]
"""
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

fixture = sys.argv[1] if len(sys.argv) > 1 else "fixtures/cls-tiny"
trials = int(sys.argv[2]) if len(sys.argv) > 2 else 200
torch.set_num_threads(2)
W = load_file(f"{fixture}/weights.safetensors")
io = load_file(f"{fixture}/io_f64.safetensors")
zstar = [io["train.zstar.0"], io["train.zstar.1"]]
labels = io["train.labels"]


def bn(x, p, affine):
    w = W[p + ".weight"].to(x.dtype) if affine else None
    b = W[p + ".bias"].to(x.dtype) if affine else None
    return F.batch_norm(x, None, None, w, b, training=True, momentum=0.1, eps=1e-5)


def conv(x, p, stride=1, bias=False):
    w = W[p + ".weight"].to(x.dtype)
    b = W[p + ".bias"].to(x.dtype) if bias else None
    return F.conv2d(x, w, b, stride=stride, padding=w.shape[-1] // 2)


def bottleneck(x, p):
    t = F.relu(bn(conv(x, p + ".conv1"), p + ".bn1", False))
    t = F.relu(bn(conv(t, p + ".conv2"), p + ".bn2", False))
    t = bn(conv(t, p + ".conv3"), p + ".bn3", False)
    return F.relu(t + bn(conv(x, p + ".downsample.0"), p + ".downsample.1", True))


def head(y0, y1):
    a = bottleneck(y0, "incre_modules.0.0")
    d = F.relu(bn(conv(a, "downsamp_modules.0.0", 2, True), "downsamp_modules.0.1", True))
    a = bottleneck(y1, "incre_modules.1.0") + d
    pre = bn(conv(a, "final_layer.0", 1, True), "final_layer.1", True)
    pooled = F.relu(pre).mean((2, 3))
    w, b = W["classifier.weight"].to(pre.dtype), W["classifier.bias"].to(pre.dtype)
    return pre, pooled @ w.t() + b


def grad_at(ys):
    ys = [y.clone().requires_grad_(True) for y in ys]
    pre, logits = head(*ys)
    F.cross_entropy(logits, labels).backward()
    return pre.detach().double().flatten(), torch.cat([y.grad.double().flatten() for y in ys])


def step_ulps(x, k):
    steps = torch.randint(-k, k + 1, x.shape)
    for i in range(k):
        x = torch.where(steps > i, torch.nextafter(x, torch.full_like(x, float("inf"))), x)
        x = torch.where(steps < -i, torch.nextafter(x, torch.full_like(x, float("-inf"))), x)
    return x


pre64, g64 = grad_at(zstar)
near = sorted(range(pre64.numel()), key=lambda i: abs(pre64[i].item()))[:4]
print("final-layer pre-activations nearest the kink (float64):",
      ", ".join(f"[{i}] {pre64[i].item():+.2e}" for i in near),
      f"(layer max {pre64.abs().max().item():.2f})")
rounded = [z.float() for z in zstar]
pre32, g32 = grad_at(rounded)
print(f"float32 head at the rounded point: dL/df(z*) off by {((g32 - g64).norm() / g64.norm()).item():.1e}, "
      f"pre-activation rounding error up to {(pre32 - pre64).abs().max().item():.1e}")
torch.manual_seed(0)
for k in (1, 2, 4):
    changes = []
    for _ in range(trials):
        _, g = grad_at([step_ulps(z, k) for z in rounded])
        changes.append(((g - g64).norm() / g64.norm()).item())
    flagged = sum(c > 1e-4 for c in changes)
    print(f"±{k} ulp per element: dL/df(z*) moves by more than 1e-4 in {flagged}/{trials} "
          f"trials (largest {max(changes):.1e})")

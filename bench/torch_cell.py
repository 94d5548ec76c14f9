#!/usr/bin/env python3
"""Reference timings for the MDEQ cell f(z; x) in PyTorch (CPU, or a CUDA device with --device).

The cell is written here from docs/reference.md (sections 1.3-1.6); no official MDEQ
code is imported. The weights are a fixture's official `fullstage.*` tensors. `--check` proves that
this is the official cell: one application to the stored z0 must match the stored f_z0 to a
relative error <= 1e-5 (max|a-b| / max|b|, per branch).

Timing mode (default) uses a random z and injection x (only branch 0 gets a non-zero injection, as
in the model). Dropout is the identity (eval, or p = 0). Measured:
  (a) cell_nograd  one application of f under no_grad, with weight-normalised weights computed
                   beforehand (the solver reuses them too).
  (b) fwd_bwd      weight norm + f with autograd, then the backward of sum(f(z)*v) to z and to
                   every parameter (g, v, GroupNorm, fuse convs).
  (c) vjp_z        one VJP v^T df/dz through an already recorded graph (autograd.grad,
                   retain_graph=True), the unit of work of the implicit backward's solver.
  (d) train_step   one DEQ training step at fixed counts: weight norm once; --f-steps applications
                   under no_grad from z = 0 standing in for the forward solver (PLAIN iteration
                   z <- f(z); Broyden's low-rank updates are NOT included); one recorded f(z*);
                   --b-steps VJPs y <- y J + gbar through that graph (plain iteration standing in
                   for the backward Broyden); one final backward of y to all parameters.
                   Stem and head are not included.
Each figure is the median and minimum wall time plus the median process CPU time (all threads
summed; CPU/wall well below --threads means other processes held the cores). Peak RSS (ru_maxrss,
a process high-water mark) is taken before timing (importing torch alone is ~0.5 GiB) and after
each phase. JSON goes to stdout, readable lines to stderr. OMP_WAIT_POLICY defaults to PASSIVE
here (reason at the torch import; export OMP_WAIT_POLICY=ACTIVE for PyTorch's own default).

Comparing a Rust implementation: run both on the SAME machine in the same sitting, back to back
(preferably torch, rust, torch), with the same --threads, --batch and --hw (branch-0 size), and
record the 1-minute load average of each run. Report RATIOS rust/torch per figure (a)-(d), for the
medians and the minima (the minimum is less noisy under load); absolute milliseconds from other
machines or runs are not comparable. The Rust side must time the same work: (a) with precomputed
weight-norm weights; (b) and (d) including the weight-norm forward and backward; (d) with the same
step counts and plain iteration (time a real solver's own overhead separately). Its thread pool
should sleep when idle, like OMP_WAIT_POLICY=PASSIVE here, or both runs should say which they used.
"""
import argparse, json, os, resource, statistics, sys, time

# libgomp's default busy-wait makes every parallel op wait a scheduler time slice when the cores are
# shared (measured: 7x slower with 2 threads at load 5.5 on 2 cores). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import torch.nn.functional as F


def load_file(path, device="cpu"):
    """A safetensors file as {name: tensor}; without the safetensors package (a bare PyTorch
    environment, e.g. on a GPU machine), read from the format directly: an 8-byte little-endian
    header length, a JSON header of dtype, shape and byte range per tensor, then the data."""
    try:
        from safetensors.torch import load_file as load
        return load(path, device=device)
    except ImportError:
        pass
    dtypes = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "F16": torch.float16,
              "BF16": torch.bfloat16, "U8": torch.uint8, "I32": torch.int32}
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        data = bytearray(fh.read())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        t = torch.frombuffer(data[a:b], dtype=dtypes[info["dtype"]]) if b > a else torch.empty(0, dtype=dtypes[info["dtype"]])
        out[name] = t.reshape(info["shape"]).clone().to(device)
    return out

PREFIX = "fullstage."
GN_EPS = 1e-5


def expected_keys(cfg):
    """Official state_dict names (without the prefix) of the cell, from the config."""
    n, wn = cfg["num_branches"], cfg.get("wnorm", True)
    conv = lambda p: [p + ".weight_g", p + ".weight_v"] if wn else [p + ".weight"]
    gn = lambda p, affine: [p + ".weight", p + ".bias"] if affine else []
    keys = []
    for i in range(n):
        b = f"branches.{i}.blocks.0."
        keys += conv(b + "conv1") + conv(b + "conv2")
        keys += sum((gn(b + g, cfg["block_gn_affine"]) for g in ("gn1", "gn2", "gn3")), [])
        if n == 1:
            break
        for j in range(n):
            p = f"fuse_layers.{i}.{j}.net."
            if j > i:  # upsample j -> i
                keys += [p + "conv.weight"] + gn(p + "gnorm", cfg["fuse_gn_affine"])
            for s in range(i - j):  # downsample chain j -> i
                keys += [f"{p}{s}.conv.weight"] + gn(f"{p}{s}.gnorm", cfg["fuse_gn_affine"])
        keys += conv(f"post_fuse_layers.{i}.conv") + gn(f"post_fuse_layers.{i}.gnorm", cfg["post_gn_affine"])
    return keys


class Cell:
    """MDEQ f(z; x), eval mode. z, x: lists of (B, C_i, H_i, W_i) tensors, branch 0 the finest."""

    def __init__(self, cfg, state, dtype=torch.float32):
        self.n, self.G, self.Gp = cfg["num_branches"], cfg["num_groups"], cfg["post_fuse_num_groups"]
        self.P = {k[len(PREFIX):]: t.to(dtype) for k, t in state.items() if k.startswith(PREFIX)}
        want = set(expected_keys(cfg))
        if want != set(self.P):
            sys.exit(f"key mismatch: missing {sorted(want - set(self.P))}, unexpected {sorted(set(self.P) - want)}")
        E, C = cfg["expansion_factor"], cfg["num_channels"]
        for i in range(self.n):  # shape sanity against the config
            w1 = self.P.get(f"branches.{i}.blocks.0.conv1.weight_v", self.P.get(f"branches.{i}.blocks.0.conv1.weight"))
            assert w1.shape[:2] == (E * C[i], C[i]), (i, w1.shape)

    def weights(self):
        """Weights for one forward call: w = v * (g / ||v||), norm per output channel, no epsilon."""
        W = dict(self.P)
        for k, v in self.P.items():
            if k.endswith(".weight_v"):
                base = k[: -len("_v")]
                W[base] = v * (self.P[base + "_g"] / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
        return W

    def gn(self, W, t, groups, name):  # non-affine GroupNorms have no keys -> None
        return F.group_norm(t, groups, W.get(name + ".weight"), W.get(name + ".bias"), GN_EPS)

    def fuse(self, W, t, i, j):
        if i == j:
            return t
        p = f"fuse_layers.{i}.{j}.net."
        if j > i:  # 1x1 conv + GN at the coarse resolution, then nearest upsampling
            t = self.gn(W, F.conv2d(t, W[p + "conv.weight"]), self.G, p + "gnorm")
            return F.interpolate(t, scale_factor=2 ** (j - i), mode="nearest")
        k = i - j  # k stages of stride-2 3x3 conv + GN; ReLU between stages, not after the last one
        for s in range(k):
            t = self.gn(W, F.conv2d(t, W[f"{p}{s}.conv.weight"], stride=2, padding=1), self.G, f"{p}{s}.gnorm")
            if s < k - 1:
                t = F.relu(t)
        return t

    def __call__(self, W, z, x):
        b = []
        for i in range(self.n):
            p = f"branches.{i}.blocks.0."
            w1, w2 = W[p + "conv1.weight"], W[p + "conv2.weight"]
            t = F.relu(self.gn(W, F.conv2d(z[i], w1, padding=w1.shape[-1] // 2), self.G, p + "gn1"))
            t = F.conv2d(t, w2, padding=w2.shape[-1] // 2)  # (variational dropout: identity in eval)
            t = self.gn(W, t + x[i], self.G, p + "gn2") + z[i]  # injection before GN2, then residual
            b.append(self.gn(W, F.relu(t), self.G, p + "gn3"))  # ReLU, then GN3
        if self.n == 1:
            return b
        out = []
        for i in range(self.n):
            y = 0
            for j in range(self.n):
                y = y + self.fuse(W, b[j], i, j)
            p = f"post_fuse_layers.{i}."
            out.append(self.gn(W, F.conv2d(F.relu(y), W[p + "conv.weight"]), self.Gp, p + "gnorm"))
        return out


def check(cfg, state, fixture):
    worst = 0.0
    for fname, dtype, gate in (("io.safetensors", torch.float32, True), ("io_f64.safetensors", torch.float64, False)):
        path = os.path.join(fixture, fname)
        if not os.path.exists(path):
            continue
        io, cell = load_file(path), Cell(cfg, state, dtype)
        get = lambda name: [io[f"{name}.{i}"].to(dtype) for i in range(cell.n)]
        with torch.no_grad():
            out = cell(cell.weights(), get("z0"), get("injection"))
        for i, (a, ref) in enumerate(zip(out, get("f_z0"))):
            err = (a - ref).abs().max().item()
            rel = err / ref.abs().max().item()
            tag = "" if gate else "  (info only)"
            print(f"{fname:20s} branch {i} {tuple(ref.shape)}: max_abs_err {err:.3e}  rel_err {rel:.3e}{tag}")
            if gate:
                worst = max(worst, rel)
    ok = worst <= 1e-5
    print(f"check {'PASSED' if ok else 'FAILED'}: worst float32 rel_err {worst:.3e} (limit 1e-5)")
    return 0 if ok else 1


def sync():
    """Waits for queued GPU work, so that a timing ends when the device is done."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timeit(fn, warmup, repeats):
    """Wall time (perf_counter) per call; cpu_median_ms is process CPU time, all threads summed."""
    for _ in range(warmup):
        fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return {"median_ms": statistics.median(wall), "min_ms": min(wall), "cpu_median_ms": statistics.median(cpu)}


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def bench(cfg, state, args):
    cell = Cell(cfg, state)
    n, C = cell.n, cfg["num_channels"]
    if args.hw:
        H0, W0 = (int(s) for s in args.hw.lower().split("x"))
    else:  # branch-0 size of the fixture's own input
        H0, W0 = (s // 2 ** cfg.get("downsample_times", 0) for s in cfg["input_shape"][2:])
    if H0 % 2 ** (n - 1) or W0 % 2 ** (n - 1):
        sys.exit(f"--hw {H0}x{W0} must be divisible by 2^(n-1) = {2 ** (n - 1)}")
    shapes = [(args.batch, C[i], H0 >> i, W0 >> i) for i in range(n)]
    torch.manual_seed(args.seed)
    z = [torch.randn(s) for s in shapes]
    x = [torch.randn(s) if i == 0 else torch.zeros(s) for i, s in enumerate(shapes)]
    v = [torch.randn(s) for s in shapes]  # cotangent, stands in for dL/df from the head
    params = [t.requires_grad_() for t in cell.P.values()]
    leaf = lambda ts: [t.detach().requires_grad_() for t in ts]
    load_before, rss_base = os.getloadavg()[0], peak_rss_mib()  # torch's import alone is ~0.5 GiB
    res, rss = {}, {}

    with torch.no_grad():
        W_fixed = cell.weights()

    def cell_nograd():
        with torch.no_grad():
            cell(W_fixed, z, x)

    def fwd_bwd():
        zr = leaf(z)
        torch.autograd.grad(cell(cell.weights(), zr, x), zr + params, v)

    z_rec = leaf(z)
    out_rec = cell(cell.weights(), z_rec, x)

    def vjp_z():
        torch.autograd.grad(out_rec, z_rec, v, retain_graph=True)

    finite = []

    def train_step():
        W = cell.weights()  # once per forward call, recorded (gradients reach g and v)
        with torch.no_grad():
            zs = [torch.zeros(s) for s in shapes]
            for _ in range(args.f_steps):  # stand-in for the forward Broyden solve
                zs = cell(W, zs, x)
        zs = leaf(zs)
        out = cell(W, zs, x)  # the one differentiable application f(z*)
        y = v
        for _ in range(args.b_steps):  # stand-in for the backward solve of y = y J + gbar
            y = [a + g for a, g in zip(torch.autograd.grad(out, zs, y, retain_graph=True), v)]
        grads = torch.autograd.grad(out, params, y)
        finite.append(all(torch.isfinite(t).all().item() for t in y + list(grads)))

    figures = (("cell_nograd", cell_nograd), ("fwd_bwd", fwd_bwd), ("vjp_z", vjp_z), ("train_step", train_step))
    only = [f for f in args.only.split(",") if f]
    unknown = set(only) - {name for name, _ in figures}
    if unknown:
        sys.exit(f"--only: unknown figures {sorted(unknown)}")
    for name, fn in figures:
        if only and name not in only:
            continue
        r = res[name] = timeit(fn, args.warmup, args.repeats)
        rss[name] = peak_rss_mib()
        print(f"{name:12s} median {r['median_ms']:9.2f} ms  min {r['min_ms']:9.2f} ms  (cpu median "
              f"{r['cpu_median_ms']:9.2f} ms)  peak RSS so far {rss[name]:6.1f} MiB", file=sys.stderr)
    report = {
        "fixture": os.path.abspath(args.fixture), "torch_version": torch.__version__,
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0],
        "device": args.device, "batch": args.batch, "hw_branch0": [H0, W0], "state_shapes": shapes, "dtype": "float32",
        "f_steps": args.f_steps, "b_steps": args.b_steps, "warmup": args.warmup, "repeats": args.repeats,
        "solver_stand_in": "plain fixed-point iteration (forward) and y <- yJ + gbar (backward)",
        "train_step_values_finite": all(finite) if finite else None,
        "timings_ms": res, "peak_rss_mib_before_timing": rss_base, "peak_rss_mib_after": rss,
    }
    print(f"threads {report['threads']} (OMP_WAIT_POLICY {report['omp_wait_policy']}), load avg (1 min) "
          f"{load_before:.2f} -> {report['loadavg_1min_after']:.2f}, torch {torch.__version__}, shapes {shapes}",
          file=sys.stderr)
    print(json.dumps(report, indent=1))
    return 0


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", default=os.path.join(here, "..", "fixtures", "cls-tiny"))
    ap.add_argument("--check", action="store_true", help="compare one application with the stored f_z0")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--hw", default=None, help="branch-0 state size HxW (default: the fixture's, 32x32 for cls)")
    ap.add_argument("--only", default="", help="comma-separated figures to time (default all): "
                    "cell_nograd, fwd_bwd, vjp_z, train_step")
    for flag, default in (("--batch", 32), ("--threads", 2), ("--warmup", 3), ("--repeats", 15),
                          ("--f-steps", 18), ("--b-steps", 20), ("--seed", 0)):
        ap.add_argument(flag, type=int, default=default, help=f"default {default}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open(os.path.join(args.fixture, "meta.json")) as fh:
        cfg = json.load(fh)["config"]
    state = load_file(os.path.join(args.fixture, "weights.safetensors"), device=args.device)
    torch.set_default_device(args.device)  # z, x, v and the solver's zeros live there too
    return check(cfg, state, args.fixture) if args.check else bench(cfg, state, args)


if __name__ == "__main__":
    sys.exit(main())

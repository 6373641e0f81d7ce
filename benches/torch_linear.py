#!/usr/bin/env python3
"""PyTorch's dense and CSR sparse linear layers, on the shapes of `sbdnet bench linear`.

For anyone with `pip install torch` (CPU build is enough). Times, per shape and batch:
  dense:  torch.nn.functional.linear(X, W)            Y[B][M] = X[B][N] W^T
  csr:    torch.sparse.mm(W_csr, X^T)                  Y^T[M][B], W stored as sparse_csr
and, with --train, a training step of the layer (forward + input gradient + weight gradient
through autograd; the CSR weight gradient is restricted to the stored entries by torch).
The CSR matrix has exactly the non-zeros of a diagonal matrix at the same sparsity
(K * min(M, N) with K = ceil((1 - s) * M * N / min(M, N))), at uniformly random positions.

    python benches/torch_linear.py                       # default table, 1 thread
    python benches/torch_linear.py --json > torch.jsonl  # one JSON object per line as well
    python benches/torch_linear.py --shapes 3072x768 --batches 16 --threads 2
"""

import argparse
import json
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F


def diag_nnz(m, n, s):
    d, p = min(m, n), max(m, n)
    k = math.ceil((1.0 - s) * m * n / d - 1e-6 * p)
    return max(1, min(p, k)) * d


def random_csr(m, n, nnz, gen):
    idx = torch.randperm(m * n, generator=gen)[:nnz].sort().values
    rows, cols = idx // n, idx % n
    vals = torch.randn(nnz, generator=gen) / math.sqrt(max(1.0, nnz / m))
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (m, n)).coalesce()
    return coo.to_sparse_csr()


def time_calls(fn, min_seconds, warmup):
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    probe = 0
    while probe < 3 or time.perf_counter() - t0 < 0.02:
        fn()
        probe += 1
    per = (time.perf_counter() - t0) / probe
    iters = max(10, min(100_000, math.ceil(min_seconds / max(per, 1e-9))))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times), max(times), iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="3072x768,768x3072,2304x768", help="MxN (out x in), comma-separated")
    ap.add_argument("--batches", default="1,16,197")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kinds", default="dense,csr")
    ap.add_argument("--train", action="store_true", help="time forward + both gradients")
    ap.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="also print one JSON object per measurement")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # sparse CSR is 'beta'
    if not 0.0 <= a.sparsity < 1.0:
        ap.error("--sparsity must be in [0, 1)")
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(1)
    rows = []
    print(f"torch {torch.__version__}, {a.threads} thread(s), sparsity {a.sparsity}, {'train step' if a.train else 'forward'}")
    print(f"{'kind':6} {'M x N':>10} {'batch':>5} {'nnz':>9} {'median ms':>10} {'min':>9} {'max':>9}")
    for shape in a.shapes.split(","):
        m, n = (int(v) for v in shape.lower().split("x"))
        nnz = diag_nnz(m, n, a.sparsity)
        for b in (int(v) for v in a.batches.split(",")):
            x = torch.randn(b, n, generator=gen)
            dy = torch.randn(b, m, generator=gen) * 1e-3
            for kind in a.kinds.split(","):
                if kind == "dense":
                    w = torch.randn(m, n, generator=gen) / math.sqrt(n)
                    if a.train:
                        w.requires_grad_(True)
                        xr = x.clone().requires_grad_(True)

                        def fn():
                            y = F.linear(xr, w)
                            y.backward(dy)
                    else:

                        def fn():
                            with torch.no_grad():
                                F.linear(x, w)

                    count = m * n
                elif kind == "csr":
                    w = random_csr(m, n, nnz, gen)
                    xt = x.t().contiguous()
                    if a.train:
                        w.requires_grad_(True)
                        xr = xt.clone().requires_grad_(True)
                        dyt = dy.t().contiguous()

                        def fn():
                            y = torch.sparse.mm(w, xr)
                            y.backward(dyt)
                    else:

                        def fn():
                            with torch.no_grad():
                                torch.sparse.mm(w, xt)

                    count = w.values().numel()
                else:
                    ap.error(f"unknown kind {kind}")
                med, lo, hi, iters = time_calls(fn, a.seconds, a.warmup)
                print(f"{kind:6} {m:>5}x{n:<5} {b:>5} {count:>9} {med:>10.4f} {lo:>9.4f} {hi:>9.4f}")
                rows.append(dict(kind=f"torch-{kind}", m=m, n=n, batch=b, sparsity=a.sparsity, threads=a.threads,
                                 train=a.train, nnz=count, iters=iters, median_ms=med, min_ms=lo, max_ms=hi))
    if a.json:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()

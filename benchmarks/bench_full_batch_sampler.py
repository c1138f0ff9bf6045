"""The calibrated defaults' sampler against a hand-written batched reference of the same sampler, side by side.

The sampler ``compute_bif`` runs by default (``bif_fast.calibrate``): BAOAB (kinetic Langevin) with the
rank-32 low-rank curvature mass, full-batch gradients, one step between draws, the draw's training losses
taken from the step's forward (``diagnostics["forward_reuse"]``) and the query losses evaluated at every
draw. The problem is the digits setting of the LDS harness itself (64-128-10 tanh, 9,610 parameters, 1,000
training and 200 query points, per-sample cross-entropy), its reference model at the minimum of its
objective (from ``benchmarks/lds/cache``), and the settings ``bif_fast.calibrate`` chooses for it (step,
friction, nbeta, localization, weight decay, the rank-32 mass), given to both sides, 8 chains. Real values
matter on a CPU: chains that leave w* saturate the tanh units, whose gradients then fill with subnormal
floats that slow the matrix products several-fold, so both sides check that their chains stayed in w*'s
basin.

Providers, interleaved in one process, medians over ``--repeats`` (each repeat runs every provider once):

- ``bif_fast`` / ``bif_fast_batched``: ``compute_bif`` with that config, ``chain_batch=1`` (one by one)
  and ``chain_batch=8`` (the chains stacked, one vmapped forward/backward: what ``auto`` picks for this
  model with full-batch gradients).
  Chain-steps per second count the sampling loop only (``diagnostics["chain_seconds"]``: the draws, the
  steps, the accumulators), not the set-up at w* (the Lanczos eigenpairs of the mass, the evaluation at
  w*), which a real run pays once.
- ``reference``: the same sampler written by hand for this one MLP, all 8 chains at once: ``bmm`` forward
  and analytic backward (no autograd), the training losses from the step's forward, the same mass applied
  as two ``[8, N] x [N, 32]`` products per step, BAOAB's B-A-O-A in plain tensor ops, the query losses by
  one batched forward per draw, and the draws folded into a running cross-covariance by one
  ``[n, 8] x [8, p]`` product per draw. Its gradient is checked against autograd before timing.
- ``reference_one_chain``: the same hand-written sampler run one chain at a time (``[1, ...]`` batches):
  what the hand-written code gains from stepping the chains together.

The ratio ``bif_fast / reference`` is the figure (above 1: bif_fast is faster). The minor page faults
per chain-step are printed beside it: glibc's malloc may hand each large activation fresh pages until its
adaptive thresholds have risen (``bif_fast.engine.host_memory``, which ``compute_bif`` runs before its
first CPU run, so both sides here sample after it); ``--malloc pinned`` fixes them for the whole process.

    python benchmarks/bench_full_batch_sampler.py               # 5 repeats, 2 threads, 200 draws per chain
    python benchmarks/bench_full_batch_sampler.py --malloc pinned   # glibc malloc's thresholds pinned
    python benchmarks/bench_full_batch_sampler.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.utils import PINNED_MALLOC, quantiles, write_rows  # noqa: E402

D_IN, HIDDEN, CLASSES, N_TRAIN, N_QUERY, CHAINS, RANK = 64, 128, 10, 1000, 200, 8, 32


def problem(device: torch.device):
    """The LDS harness's digits reference model (float32) and its data."""
    from benchmarks.lds.ground_truth import ground_truth
    from benchmarks.lds.methods import float32_problem
    from benchmarks.lds.run import _reference_model
    from benchmarks.lds.settings import SETTINGS

    setting = SETTINGS["digits"]()
    reference = _reference_model(setting, ground_truth(setting, log=lambda *a: None))
    model, train, query = float32_problem(setting, reference)
    to = lambda ds: torch.utils.data.TensorDataset(*(t.to(device) for t in ds.tensors))  # noqa: E731
    return model.to(device), to(train), to(query)


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def calibrated(model, train, query):
    """The calibrated sampler settings and mass (a short budget: the length is set here, not by it)."""
    from bif_fast.calibration import calibrate_with_mass

    cal = calibrate_with_mass(model, train, query, loss_fn=loss_fn, budget_seconds=10.0)
    assert cal.config.sgld.mass == "curvature" and cal.mass is not None and cal.mass.rank == RANK
    return cal.config.sgld, cal.mass


def sampler_config(sgld, draws: int, chain_batch: int):
    from bif_fast import BIFConfig

    return BIFConfig(sgld=sgld, num_chains=CHAINS, num_draws=draws, batch_size="full", eval_batch_size=1024,
                     compute_stderr=True, chain_batch=chain_batch, seed=0)  # fmt: skip


def run_bif_fast(model, train, query, sgld, draws: int, chain_batch: int) -> float:
    from bif_fast import compute_bif

    res = compute_bif(model, train, query, loss_fn=loss_fn, config=sampler_config(sgld, draws, chain_batch))
    assert res.diagnostics["forward_reuse"], "the benchmark measures the forward-reuse path"
    assert not any(res.diagnostics["diverged"]) and not any(res.diagnostics["escaped"]), "a chain left w*'s basin"
    groups = {}
    for chain, s in enumerate(res.diagnostics["chain_seconds"]):
        groups.setdefault(chain // res.diagnostics["chain_batch"], s)  # a group's chains share its time
    return CHAINS * (draws - 1) / sum(groups.values())


class Reference:
    """BAOAB with a low-rank mass, full batch, for ``Linear-Tanh-Linear`` with cross-entropy, C chains."""

    def __init__(self, model, train, query, sgld, mass, draws: int, device: torch.device, together: int = CHAINS):
        self.x, self.y = train.tensors
        self.xq, self.yq = query.tensors
        self.draws = draws
        w1, b1, w2, b2 = (p.detach() for p in model.parameters())
        self.shapes = [w1.shape, b1.shape, w2.shape, b2.shape]
        self.anchor = torch.cat([t.reshape(-1) for t in (w1, b1, w2, b2)]).float()
        self.basis, self.scale = mass.basis.to(device), mass.scale.to(device)
        self.sgld = sgld
        self.lr, self.gamma = sgld.lr, sgld.friction
        self.c = torch.exp(torch.tensor(-self.gamma * self.lr)).item()
        self.onehot = torch.nn.functional.one_hot(self.y, CLASSES).float()
        self.device = device
        self.at_w_star = float(self.forward_backward(self.anchor[None])[0].mean())
        self.together = together  # chains stepped at once (the rest run in later groups)

    def unpack(self, w: torch.Tensor):
        out, start = [], 0
        for shape in self.shapes:
            size = int(torch.Size(shape).numel())
            out.append(w[:, start : start + size].reshape(w.shape[0], *shape))
            start += size
        return out

    def forward_backward(self, w: torch.Tensor):
        """Per-sample training losses ``[C, n]`` and the flat gradient of their mean ``[C, N]``."""
        w1, b1, w2, b2 = self.unpack(w)
        c = w.shape[0]
        x = self.x.expand(c, -1, -1)
        hidden = torch.tanh(torch.baddbmm(b1[:, None, :], x, w1.transpose(1, 2)))
        logits = torch.baddbmm(b2[:, None, :], hidden, w2.transpose(1, 2))
        lse = logits.logsumexp(-1, keepdim=True)
        losses = (lse - (logits * self.onehot).sum(-1, keepdim=True)).squeeze(-1)
        dlogits = (torch.exp(logits - lse) - self.onehot) / self.x.shape[0]
        gw2, gb2 = torch.bmm(dlogits.transpose(1, 2), hidden), dlogits.sum(1)
        dpre = torch.bmm(dlogits, w2) * (1 - hidden * hidden)
        gw1, gb1 = torch.bmm(dpre.transpose(1, 2), x), dpre.sum(1)
        return losses, torch.cat([t.reshape(c, -1) for t in (gw1, gb1, gw2, gb2)], 1)

    def query_losses(self, w: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = self.unpack(w)
        xq = self.xq.expand(w.shape[0], -1, -1)
        hidden = torch.tanh(torch.baddbmm(b1[:, None, :], xq, w1.transpose(1, 2)))
        logits = torch.baddbmm(b2[:, None, :], hidden, w2.transpose(1, 2))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, CLASSES), self.yq.repeat(w.shape[0]),
                                                 reduction="none").reshape(w.shape[0], -1)  # fmt: skip

    def precondition(self, v: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        return v + ((v @ self.basis) * factor) @ self.basis.T

    def run(self) -> float:
        """All chains, ``draws`` draws each, ``together`` at a time; returns chain-steps per second."""
        t0 = time.perf_counter()
        for _ in range(CHAINS // self.together):
            self._group(self.together)
        return CHAINS * (self.draws - 1) / (time.perf_counter() - t0)

    def _group(self, chains: int) -> None:
        nbeta, loc, wd = self.sgld.nbeta, self.sgld.localization, self.sgld.weight_decay
        w = self.anchor.expand(chains, -1).clone()
        u = self.precondition(torch.randn_like(w), self.scale - 1)
        sum_a = torch.zeros(N_TRAIN, dtype=torch.float64, device=self.device)
        sum_b = torch.zeros(N_QUERY, dtype=torch.float64, device=self.device)
        cross = torch.zeros(N_TRAIN, N_QUERY, dtype=torch.float64, device=self.device)
        noise_scale = (1 - self.c * self.c) ** 0.5
        for d in range(self.draws):
            losses, grad = self.forward_backward(w)
            q = self.query_losses(w)
            a, b = losses.double(), q.double()  # the draw: the training losses from this step's forward
            sum_a += a.sum(0)
            sum_b += b.sum(0)
            cross.addmm_(a.T, b)
            if d == self.draws - 1:
                break
            # BAOAB with the closing half-kick of one step merged into the opening one of the next (one
            # gradient per step, as the fused kernel does): B (kick lr, lr/2 on the first step), A, O, A.
            force = grad * nbeta + (w - self.anchor) * loc + w * wd
            kick = 0.5 * self.lr if d == 0 else self.lr
            u -= kick * self.precondition(force, self.scale.square() - 1)
            w += 0.5 * self.lr * u
            u.mul_(self.c).add_(self.precondition(torch.randn_like(w), self.scale - 1), alpha=noise_scale)
            w += 0.5 * self.lr * u
        total = chains * self.draws
        cov = cross / total - torch.outer(sum_a / total, sum_b / total)
        assert bool(torch.isfinite(cov).all())
        rise = float(losses.mean() - self.at_w_star)  # the chains' last mean training loss over w*'s
        assert rise < 1.0, f"the reference's chains left w*'s basin (mean training loss up {rise:.3g})"

    def check_gradient(self, model, train) -> float:
        """Max relative difference between the analytic gradient at w* and autograd's."""
        _, grad = self.forward_backward(self.anchor[None])
        model.zero_grad()
        loss_fn(model, train.tensors).mean().backward()
        auto = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        return float((grad[0] - auto).abs().max() / auto.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--malloc", choices=["glibc", "pinned"], default="glibc",
                    help="glibc's own malloc thresholds, or pinned (benchmarks.utils.PINNED_MALLOC: the process "
                         "is started again with them in its environment); recorded as its own mode")  # fmt: skip
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.malloc == "pinned" and any(os.environ.get(k) != v for k, v in PINNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED_MALLOC})
    mode = "baoab+mass,full-batch" + (",malloc-pinned" if args.malloc == "pinned" else "")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, train, query = problem(device)
    sgld, mass = calibrated(model, train, query)
    print(f"calibrated: nbeta {sgld.nbeta:.3g}, localization {sgld.localization:.3g}, lr {sgld.lr:.3g}, "
          f"friction {sgld.friction:.3g}, mass rank {mass.rank}")
    ref = Reference(model, train, query, sgld, mass, args.draws, device)
    err = ref.check_gradient(model, train)
    assert err < 1e-4, f"the reference's analytic gradient is off by {err:.2e}"
    providers = {
        "bif_fast": lambda: run_bif_fast(model, train, query, sgld, args.draws, 1),
        "bif_fast_batched": lambda: run_bif_fast(model, train, query, sgld, args.draws, CHAINS),
        "reference": ref.run,
        "reference_one_chain": Reference(model, train, query, sgld, mass, args.draws, device, together=1).run,
    }
    for fn in providers.values():  # warm-up: allocator, kernels, the mass's Lanczos
        fn()
    rates: dict[str, list[float]] = {name: [] for name in providers}
    faults: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(args.repeats):
        for name, fn in providers.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            rates[name].append(fn())
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (CHAINS * args.draws))
    shape = f"lds digits at w*,mlp{D_IN}-{HIDDEN}-{CLASSES},n{N_TRAIN},q{N_QUERY},c{CHAINS},rank{RANK},calibrated"
    rows = []
    print(f"{'provider':18s} chain-steps/s (p50 [p20, p80])   / reference (median of per-repeat ratios)"
          "   page faults per chain-step")
    for name, values in rates.items():
        p50, p20, p80 = quantiles(values)
        ratio = statistics.median(v / r for v, r in zip(values, rates["reference"], strict=True))
        print(f"{name:18s} {p50:8.0f} [{p20:.0f}, {p80:.0f}]   {ratio:.2f}x   {statistics.median(faults[name]):.0f}")
        rows.append({"provider": name, "mode": mode, "shape": shape, "dtype": "float32",
                     "metric": "chain_steps_per_s", "unit": "1/s", "p50": p50, "p20": p20, "p80": p80,
                     "n_runs": len(values)})  # fmt: skip
        f = statistics.median(faults[name])
        rows.append({"provider": name, "mode": mode, "shape": shape, "dtype": "float32",
                     "metric": "page_faults_per_chain_step", "unit": "count", "p50": f, "p20": f, "p80": f,
                     "n_runs": len(values)})  # fmt: skip
        if name != "reference":
            rows.append({"provider": name, "mode": mode, "shape": shape, "dtype": "float32",
                         "metric": "ratio_vs_reference", "unit": "x", "p50": ratio, "p20": ratio, "p80": ratio,
                         "n_runs": len(values)})  # fmt: skip
    if not args.no_record:
        print(f"recorded in {write_rows('full_batch_sampler', rows)}")


if __name__ == "__main__":
    main()

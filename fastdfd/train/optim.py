"""StackedAdam: Adam with independent state per generator of a stacked ensemble.

Each parameter carries a leading generator axis K. A step updates only the rows
(generators) trained in that step, each with its own step count and bias correction,
so K generators trained in chunks are exactly K independent ``torch.optim.Adam`` runs:
a generator that sat out a step keeps its parameters *and* its moments untouched (a
global Adam would keep moving it with stale momentum).

With ``compute_device`` set (offload), parameters and moments stay where they are (pinned
host memory) and a step moves only its rows there and back: the update runs on the GPU.

Step counts are a device tensor beside the parameters (float64, as torch.optim.Adam's bias
corrections), and ``step`` computes the bias corrections from them on the device: no host
read and no Python float of the step count, so a resident update can be captured in a CUDA
graph and every replay advances the counts and corrections of that replay's rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class StackedAdam:
    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        compute_device: torch.device | str | None = None,
    ):
        if lr <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid Adam settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        self.params = dict(params)
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(betas), float(eps), float(weight_decay)
        first = next(iter(self.params.values()))
        self.num_rows = first.shape[0]
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        # float64 step counts: bias corrections as torch.optim.Adam computes them (in double)
        self.steps = torch.zeros(self.num_rows, dtype=torch.float64, device=first.device)
        self.compute_device = torch.device(compute_device) if compute_device is not None else first.device
        if self.compute_device != first.device and first.device.type == "cpu" and self.compute_device.type == "cuda":
            for table in (self.exp_avg, self.exp_avg_sq):
                for n in table:
                    table[n] = table[n].pin_memory()

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor ``step`` writes in place: parameters, both moments, step counts."""
        return [*self.params.values(), *self.exp_avg.values(), *self.exp_avg_sq.values(), self.steps]

    def graph_obstacle(self) -> str | None:
        """Why ``step`` cannot be captured in a CUDA graph, or None (resident states on one GPU)."""
        dev = self.params[next(iter(self.params))].device
        if self.compute_device != dev:
            return (f"the Adam states live in {dev} memory and each step copies its rows to {self.compute_device} "
                    "and back (offload)")
        if self.steps.device != dev:
            return f"the Adam step counts live on {self.steps.device}, the parameters on {dev}"
        return None

    def _corrections(self, rows_host: torch.Tensor | None, device: torch.device):
        """Advance the step counts of the rows; Adam's step size and sqrt(bias correction 2), per row."""
        b1, b2 = self.betas
        t = (self.steps if rows_host is None else self.steps.index_select(0, rows_host)) + 1
        if rows_host is None:
            self.steps.copy_(t)
        else:
            self.steps.index_copy_(0, rows_host, t)
        t = t.to(device)
        return (self.lr / (1 - b1**t)).float(), (1 - b2**t).sqrt().float()

    def _update(self, w, m, v, g, step_size, bc2_sqrt) -> None:
        """torch.optim.Adam's update of rows w with moments m, v, in place."""
        b1, b2 = self.betas
        if self.weight_decay:
            g = g.add(w, alpha=self.weight_decay)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        shape = (-1,) + (1,) * (w.dim() - 1)
        denom = (v.sqrt() / bc2_sqrt.view(shape)).add_(self.eps)
        w.sub_(step_size.view(shape) * m / denom)

    @torch.no_grad()
    def step(self, grads: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None) -> None:
        """Apply one Adam step to ``rows`` (all rows when None); ``grads`` are [len(rows), ...].

        Parameters and moments are gathered by row, moved to ``compute_device`` (a no-op
        unless offloaded), updated there and written back; all rows update in place.
        """
        dev, host = self.compute_device, self.steps.device
        rows_host = None if rows is None else rows.to(host)
        step_size, bc2_sqrt = self._corrections(rows_host, dev)
        for name, p in self.params.items():
            tables = (p, self.exp_avg[name], self.exp_avg_sq[name])
            if rows_host is None and dev == host:
                self._update(*tables, grads[name], step_size, bc2_sqrt)
                continue
            w, m, v = ((t if rows_host is None else t.index_select(0, rows_host)).to(dev, non_blocking=True)
                       for t in tables)
            self._update(w, m, v, grads[name].to(dev), step_size, bc2_sqrt)
            for table, new in zip(tables, (w, m, v)):
                if rows_host is None:
                    table.copy_(new)
                else:
                    table.index_copy_(0, rows_host, new.to(host))

    def state_dict(self) -> dict:
        return {
            "exp_avg": {n: t.clone() for n, t in self.exp_avg.items()},
            "exp_avg_sq": {n: t.clone() for n, t in self.exp_avg_sq.items()},
            "steps": self.steps.clone(),
            "hparams": {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay},
        }

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            if set(state[key]) != set(self.params):
                raise ValueError(f"optimizer state holds {sorted(state[key])}, expected {sorted(self.params)}")
            for n, t in state[key].items():
                if t.shape != self.params[n].shape:
                    raise ValueError(f"optimizer state {key}[{n}] has shape {tuple(t.shape)}, expected "
                                     f"{tuple(self.params[n].shape)}")
                getattr(self, key)[n].copy_(t)
        self.steps.copy_(state["steps"])

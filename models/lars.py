"""LARS (You et al., 2017): SGD with a layer-wise trust ratio, as used for large-batch SSL."""

import torch


class LARS(torch.optim.Optimizer):
    """Momentum SGD whose update of each weight matrix is scaled by eta * |w| / |g + wd * w|.

    1-D parameters (biases, norms) get neither the trust ratio nor weight decay. Each step is a
    handful of `torch._foreach_*` kernels over all of a group's tensors, not a Python loop of
    small ones, and reads nothing back to the host.
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, eta: float = 0.001):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad.clone() for p in params]
            matrices = [i for i, p in enumerate(params) if p.ndim > 1]
            if matrices:
                weights, scaled = [params[i] for i in matrices], [updates[i] for i in matrices]
                if group["weight_decay"]:
                    torch._foreach_add_(scaled, weights, alpha=group["weight_decay"])
                param_norms = torch.stack(torch._foreach_norm(weights))
                update_norms = torch.stack(torch._foreach_norm(scaled))
                trust = torch.where(
                    (param_norms > 0) & (update_norms > 0), group["eta"] * param_norms / update_norms, 1.0
                )
                torch._foreach_mul_(scaled, list(trust.unbind()))
            running = [(self.state[p]["momentum_buffer"], u) for p, u in zip(params, updates, strict=True) if self.state[p]]
            for param, update in zip(params, updates, strict=True):
                self.state[param].setdefault("momentum_buffer", update)  # the first step's update
            if running:
                buffers = [buffer for buffer, _ in running]
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, [update for _, update in running])
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])
        return loss

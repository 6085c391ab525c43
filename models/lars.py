"""LARS (You et al., 2017): SGD with a layer-wise trust ratio, as used for large-batch SSL."""

import torch


class LARS(torch.optim.Optimizer):
    """Momentum SGD whose update of each weight matrix is scaled by eta * |w| / |g + wd * w|.

    1-D parameters (biases, norms) get neither the trust ratio nor weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = param.norm(), update.norm()
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["eta"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update * trust
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss

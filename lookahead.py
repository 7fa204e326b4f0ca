"""
The paper's optimization pieces: LookAhead (Zhang et al., 2019) around SGD, and the learning-rate
schedule, linear warmup then cosine decay to 0. train.py, probe.py and bench.py use them.

    from lookahead import LookAhead, warmup_cosine
    optimizer = LookAhead(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), k=5, alpha=0.5)
    lr = 0.2 * warmup_cosine(step, warmup=10_000, total=500_000)

Imports torch only.
"""

import math

import torch


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The lr multiplier at `step`: linear warmup from 0 over `warmup` steps, then cosine decay to 0
    at `total` (upstream's schedule; warmup=0 is the linear probe's plain cosine)."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class LookAhead:
    """LookAhead (Zhang et al., 2019) around an inner optimizer: every k steps the slow weights move
    alpha of the way to the fast weights, and the fast weights restart from the slow ones.
    Unlike upstream, state_dict() holds the slow weights and the step counter: exact resume."""

    def __init__(self, optimizer, k=5, alpha=0.5):
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.step_count = 0
        self.slow = [p.detach().clone() for p in self.params()]

    @property
    def param_groups(self):  # GradScaler unscales and clips through this
        return self.optimizer.param_groups

    def params(self):
        return [p for group in self.optimizer.param_groups for p in group['params']]

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self):
        self.optimizer.step()
        self.step_count += 1
        if self.step_count % self.k == 0:
            for slow, fast in zip(self.slow, self.params()):
                slow.lerp_(fast, self.alpha)  # slow += alpha * (fast - slow)
                fast.copy_(slow)

    def state_dict(self):
        return {'optimizer': self.optimizer.state_dict(), 'slow': self.slow,
                'step_count': self.step_count}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state['optimizer'])
        for slow, saved in zip(self.slow, state['slow']):
            slow.copy_(saved)
        self.step_count = state['step_count']

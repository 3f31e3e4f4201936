"""SignRound's optimiser written out step by step from the paper (Cheng et al., 2023, Algorithm 1, with
AutoRound's defaults): signed gradient descent, learning rate lr * (1 - t / T), V clipped to [-0.5, 0.5]
and alpha, beta to [0.5, 1] after every step, the parameters of least loss returned. Plain Python over
lists of floats: no torch.optim, no in-place tensor tricks, so it shares nothing with the code it checks."""
import math


def sign(g: float) -> float:
    return 1.0 if g > 0 else -1.0 if g < 0 else 0.0


def signround_reference(loss_and_grads, v: list[float], c: list[float], steps: int, lr: float):
    """loss_and_grads(t, v, c) -> (loss, dL/dv, dL/dc) for lists of floats -> (best v, best c, best loss)."""
    best = (math.inf, list(v), list(c))
    for t in range(steps):
        loss, gv, gc = loss_and_grads(t, v, c)
        if loss < best[0]:
            best = (loss, list(v), list(c))
        rate = lr * (1.0 - t / steps)
        v = [min(0.5, max(-0.5, x - rate * sign(g))) for x, g in zip(v, gv)]
        c = [min(1.0, max(0.5, x - rate * sign(g))) for x, g in zip(c, gc)]
    return best[1], best[2], best[0]

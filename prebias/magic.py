"""
Exact metagradients through a recorded run: which batch, at which step, moved a probe.

MAGIC (Ilyas & Engstrom 2025, on the REPLAY algorithm of Engstrom et al. 2025): weight
every trained row's loss by w (all 1 as the run trained, 0 where --train_mask zeroed it)
and differentiate the probe's loss at the last checkpoint with respect to every w[s, r]
by reverse-mode differentiation through every optimizer step, Adam's moments included.

  Replay.step    the run's own step as a pure function (theta, m, v, t, w) -> (theta', m', v'):
                 the same model (torch.func.functional_call on model.py's Transformer), the
                 per-row loss weights with --train_mask's denominator (B x T per step), gradient
                 accumulation in the run's micro-batches, torch's clip_grad_norm_ (coef =
                 max_norm / (norm + 1e-6) clamped at 1) and torch.optim.AdamW's single-tensor
                 update (the CPU path: decoupled decay lr * wd on the >= 2-D weights, bias
                 corrections, eps outside the root), op for op, so a replay from ckpt_0 with
                 zero moments reproduces the recorded checkpoints bitwise on CPU (tested)
  reverse pass   from d probe / d theta_T, the adjoint of (theta, m, v) back through every step:
                 the VJP of the clip and the AdamW update written out (elementwise, tensor
                 by tensor; held to autograd's in the tests),
                 and the Hessian-vector product through the loss gradient by double backward
                 (the gradient built with create_graph, then differentiated against the adjoint
                 of the pre-clip gradient lambda_t); the same backward gives d probe / d w[t, r]
  segments       states are recomputed, never stored for the whole run: anchors are step 0
                 (ckpt_0, zero moments) and every checkpoint whose optimizer file was kept
                 (--keep_optimizer=True), plus one every `segment` steps replayed forward; each
                 segment is replayed from its anchor keeping its states (theta, m, v and the
                 pre-clip gradient G_t) and reversed. The stretches between anchors are the
                 segments where their states fit in 1 GiB (time: 1 forward replay + 1 reverse
                 pass); else sqrt-T checkpointing (memory ~ (T/S + S) states of 4 parameter
                 vectors, time ~ 2 forward replays + 1 reverse pass)

Why on torch autograd rather than a library: bergson (EleutherAI's MAGIC) wants torch 2.14
and CUDA wheels (pip install --dry-run bergson replaces the pinned torch 2.13.0), and
torchopt's functional Adam and clip compute the same maths in another order of float
operations (eps inside the corrected root, decay added to the update), so its replay would
drift from the run in the last bits and compound; the update here is torch's own, op for op,
and tests/test_magic.py holds it to train.py's step bitwise.

The first-order effect of training batch z at step t with weight eps (trained there or not)
is eps <lambda_t, g_z(theta_t)> / B, with lambda_t = d probe / d G_t, the adjoint of the
step's summed pre-clip gradient and g_z the gradient of z's mean token loss: move_effect_magic
sums such terms for batches moved between steps, step_effect gives the curve over t.

Refused: dropout > 0 (the masks are drawn inside SDPA's fused kernel, whose double backward
does not exist on CPU, so the reverse pass could not use the run's masks), and dtypes other
than float32 (autocast's bf16/fp16 rounding is not a function of the recorded state).

$ python attribute.py --out_dir=out --probe=val --estimator=magic
$ python -c "from prebias.magic import metagradients"   # see /work/notes/magic.md
"""

import hashlib
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import ModelArgs, Transformer
from prebias.checkpoint import load_checkpoint, model_from_checkpoint, optimizer_path
from prebias.common import UserError, atomic_path, file_signature, keep_freed_memory
from prebias.schedule import get_lr


# -----------------------------------------------------------------------------
# the run's step as a pure function

@dataclass
class Hyper:
    """What a step needs besides the state: the step's learning rate and AdamW's settings."""
    lrs: np.ndarray  # (steps,) the learning rate of each step
    beta1: float
    beta2: float
    weight_decay: float
    grad_clip: float
    micro: int  # micro-batches per step (gradient accumulation, one process)
    eps: float = 1e-8  # torch.optim.AdamW's default; the run never sets it
    fused: bool = False  # the run's AdamW was torch's fused kernel (model.configure_optimizers: CPU and CUDA)


@dataclass
class State:
    """(theta, m, v) as lists in model.parameters() order, the tied classifier once."""
    theta: list
    m: list
    v: list

    def detach(self) -> "State":
        return State(*[[x.detach() for x in xs] for xs in (self.theta, self.m, self.v)])

    def flat(self) -> list:
        return self.theta + self.m + self.v


def _sqrt0(v: torch.Tensor) -> torch.Tensor:
    """sqrt(v) with the same bits, and derivative 0 where v == 0 (not inf): a coordinate
    whose second moment is 0 has had zero gradient at every step so far, so nothing upstream
    perturbs it to first order, and 0 * inf would turn the adjoint into nan."""
    pos = v > 0
    return torch.sqrt(torch.where(pos, v, torch.ones_like(v))) * pos


class Replay:
    """The run's optimizer step, pure: step(state, t, windows, w) -> (state', G_t), with
    G_t the step's summed gradient before the clip. model: a Transformer of the run's
    shape (only its structure is used; parameters come from the state). A subclass may
    change token_loss (and set plain = False): tests/test_magic.py's toy quadratic."""
    plain = True  # windows of weight 1 take model.py's own loss (bitwise train.py's unmasked path)

    def __init__(self, model, hyper: Hyper):
        self.model, self.h = model, hyper
        self.names = [n for n, _ in model.named_parameters()]  # the tied classifier is listed once
        self.decay = [p.dim() >= 2 for p in model.parameters()]  # model.configure_optimizers' groups

    def logits(self, theta: list, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, dict(zip(self.names, theta)), (x,))[0]

    def token_loss(self, theta: list, win: torch.Tensor) -> torch.Tensor:
        """(bs, T) next-token cross-entropy of windows (bs, T+1), in float32 or wider."""
        logits = self.logits(theta, win[:, :-1])
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).transpose(1, 2),
                               win[:, 1:], reduction="none")

    def micro_loss(self, theta, win: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """One micro-batch's term of the step's loss, as train.py computes it: the model's
        mean token loss where every row weighs 1 (w None), else the weighted sum over
        bs x T (masked_loss's denominator); divided by the micro-steps. float64 (the
        planted-truth checks) keeps float64 losses, where model.py's loss is float32."""
        if w is None and self.plain and theta[0].dtype == torch.float32:
            loss = functional_call(self.model, dict(zip(self.names, theta)), (win[:, :-1], win[:, 1:]))[1]
        else:
            ce = self.token_loss(theta, win)
            w = torch.ones(len(win), dtype=ce.dtype, device=ce.device) if w is None else w
            loss = (ce * w[:, None].to(ce.dtype)).sum() / ce.numel()
        return loss / self.h.micro

    def grad(self, theta, windows: torch.Tensor, w: torch.Tensor | None) -> list:
        """G: the step's gradient summed over its micro-batches in their order (as .grad
        accumulates). windows (B, T+1); w (B,) or None (every row weight 1)."""
        G = None
        for k, win in enumerate(windows.chunk(self.h.micro)):
            wk = None if w is None else w.chunk(self.h.micro)[k]
            g = torch.autograd.grad(self.micro_loss(theta, win, wk), theta)
            G = list(g) if G is None else [a + b for a, b in zip(G, g)]
        return G

    def clip(self, G: list) -> list:
        """torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms, coef =
        max_norm / (norm + 1e-6) clamped at 1, every gradient multiplied by it."""
        if not self.h.grad_clip:
            return G
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in G]), 2.0)
        coef = torch.clamp(self.h.grad_clip / (total + 1e-6), max=1.0)
        return [g * coef for g in G]

    def adamw(self, s: State, g: list, t: int) -> State:
        """torch.optim.AdamW's single-tensor update of step t (its step count t + 1), out of place."""
        h, lr, n = self.h, float(self.h.lrs[t]), float(t + 1)
        bc1, bc2 = 1 - h.beta1 ** n, 1 - h.beta2 ** n
        step_size, bc2_sqrt = lr / bc1, bc2 ** 0.5
        out = State([], [], [])
        for p, m, v, gi, dec in zip(s.theta, s.m, s.v, g, self.decay):
            if dec and h.weight_decay != 0:
                p = p * (1 - lr * h.weight_decay)
            m = torch.lerp(m, gi, 1 - h.beta1)
            v = torch.addcmul(v * h.beta2, gi, gi, value=1 - h.beta2)
            denom = _sqrt0(v) / bc2_sqrt + h.eps
            out.theta.append(torch.addcdiv(p, m, denom, value=-step_size))
            out.m.append(m)
            out.v.append(v)
        return out

    def update(self, s: State, G: list, t: int) -> State:
        return self.adamw(s, self.clip(G), t)

    def fused_update(self, s: State, G: list, t: int) -> State:
        """The same update by torch's fused AdamW kernel, the one a fused run trained with (its
        float order differs from the single-tensor loop in the last bits): the forward replay
        takes it so that the states are the run's bitwise; the reverse pass differentiates
        adamw(), the same function, at those states."""
        h, g = self.h, self.clip(G)
        out = State([x.clone() for x in s.theta], [x.clone() for x in s.m], [x.clone() for x in s.v])
        for dec in (True, False):  # model.configure_optimizers' two groups
            idx = [i for i, d in enumerate(self.decay) if d == dec]
            if idx:
                torch._fused_adamw_([out.theta[i] for i in idx], [g[i].clone() for i in idx], [out.m[i] for i in idx],
                                    [out.v[i] for i in idx], [], [torch.tensor(float(t + 1)) for _ in idx],
                                    lr=float(h.lrs[t]), beta1=h.beta1, beta2=h.beta2,
                                    weight_decay=h.weight_decay if dec else 0.0, eps=h.eps, amsgrad=False,
                                    maximize=False)
        return out

    def step(self, s: State, t: int, windows: torch.Tensor, w: torch.Tensor | None = None) -> tuple[State, list]:
        """(state after step t, G_t); w None: every row weighs 1 (the plain path, bitwise train.py's)."""
        theta = [p.detach().requires_grad_() for p in s.theta]
        G = [g.detach() for g in self.grad(theta, windows, w)]
        with torch.no_grad():
            return (self.fused_update if self.h.fused else self.update)(s.detach(), G, t), G

    def reverse(self, s: State, t: int, windows: torch.Tensor, w: torch.Tensor, G: list,
                lams: list) -> tuple[list, np.ndarray, list]:
        """One step back for each of P adjoints lams [State of d probe / d (theta, m, v)
        after step t]: (the adjoints before step t, dw (P, B) = d probe / d w[t, :],
        lambda_t per probe = d probe / d G_t, the pre-clip gradient's adjoint)."""
        back, lam_G = self._reverse_update(s, G, t, lams)
        dth, dw = self._reverse_grad(s.theta, windows, w, lam_G)
        for b, d in zip(back, dth):
            b.theta = [x + y for x, y in zip(b.theta, d)]
        return back, dw, lam_G

    def _reverse_update(self, s: State, G: list, t: int, lams: list) -> tuple[list, list]:
        """VJP of the clip and the AdamW update, written out tensor by tensor (the forward's
        elementwise values recomputed once per tensor and shared by the probes), no graph:
        at the bench's shape (1 thread) 7 ms against autograd's 15-17 ms, in a reverse step
        of ~90 ms whose rest is the Hessian-vector product (_reverse_grad, 3.0x a training
        step; forward-over-reverse by torch.func.jvp measured 1.6x slower than this double
        backward). Per tensor, not on the flattened parameters: at the 15M shape flattening's
        copies made it slower than autograd (427 against 367 ms).
        The derivative of adamw() and clip() above, term by term (tests/test_magic.py holds
        it to autograd's):
          theta' = p (1 - lr wd) - step_size m' / d,  d = sqrt0(v') / bc2_sqrt + eps
          m' = b1 m + (1 - b1) g,  v' = b2 v + (1 - b2) g^2,  g = coef G
          coef = clip / (|G| + 1e-6) where that is <= 1 (clamp passes its gradient), else 1."""
        h, lr, n = self.h, float(self.h.lrs[t]), float(t + 1)
        step_size, bc2_sqrt = lr / (1 - h.beta1 ** n), (1 - h.beta2 ** n) ** 0.5
        coef, active, total = 1.0, False, None
        if h.grad_clip:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in G]), 2.0)
            c = h.grad_clip / (total + 1e-6)
            active = bool(c <= 1.0)
            coef = torch.clamp(c, max=1.0)
        P = len(lams)
        back = [State([], [], []) for _ in range(P)]
        a_gs = [[] for _ in range(P)]
        for i, (m, v, Gi, dec) in enumerate(zip(s.m, s.v, G, self.decay)):
            g = Gi * coef
            m1 = torch.lerp(m, g, 1 - h.beta1)
            v1 = torch.addcmul(v * h.beta2, g, g, value=1 - h.beta2)
            pos = v1 > 0
            sq = torch.sqrt(torch.where(pos, v1, torch.ones_like(v1))) * pos
            denom = sq / bc2_sqrt + h.eps
            dv = torch.where(pos, 0.5 / torch.where(pos, sq, torch.ones_like(sq)), torch.zeros_like(sq)) \
                * (step_size / bc2_sqrt) * m1 / denom ** 2  # d theta' / d v', less its sign
            keep = 1 - lr * h.weight_decay if dec and h.weight_decay != 0 else 1.0
            for p, lam in enumerate(lams):
                a_th = lam.theta[i]
                a_m = lam.m[i] - step_size * a_th / denom  # theta' through m'
                a_v = lam.v[i] + a_th * dv  # theta' through d(v')
                a_gs[p].append((1 - h.beta1) * a_m + 2 * (1 - h.beta2) * g * a_v)
                back[p].theta.append(a_th * keep)
                back[p].m.append(h.beta1 * a_m)
                back[p].v.append(h.beta2 * a_v)
        lam_G = []
        for a_g in a_gs:
            a_G = [x * coef for x in a_g]
            if active:  # coef = clip / (|G| + 1e-6): d coef / d G = -clip / (|G| + 1e-6)^2 G / |G|
                k = h.grad_clip / (total + 1e-6) ** 2 * sum((x * Gi).sum() for x, Gi in zip(a_g, G)) / total
                a_G = [x - k * Gi for x, Gi in zip(a_G, G)]
            lam_G.append(a_G)
        return back, lam_G

    def _reverse_grad(self, theta: list, windows: torch.Tensor, w: torch.Tensor,
                      lam_G: list) -> tuple[list, np.ndarray]:
        """Through G(theta, w) = sum of the micro-batches' gradients: per probe, H lambda_G
        (double backward) and d <lambda_G, G> / d w. SDPA's math kernel: the fused CPU kernel
        has no double backward (same function, other rounding of the forward)."""
        P = len(lam_G)
        dth = [[torch.zeros_like(x) for x in theta] for _ in range(P)]
        dw = np.zeros((P, len(w)))
        th = [x.detach().requires_grad_() for x in theta]
        at = 0
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            for win, wk in zip(windows.chunk(self.h.micro), w.chunk(self.h.micro)):
                wk = wk.detach().clone().requires_grad_()
                g = torch.autograd.grad(self.micro_loss(th, win, wk), th, create_graph=True)
                for p in range(P):
                    dot = sum((a * b).sum() for a, b in zip(g, lam_G[p]))
                    d = torch.autograd.grad(dot, th + [wk], retain_graph=p < P - 1, allow_unused=True)
                    dth[p] = [x + (y if y is not None else 0) for x, y in zip(dth[p], d[:-1])]
                    dw[p, at:at + len(wk)] = d[-1].double().numpy()
                at += len(wk)
        return dth, dw


# -----------------------------------------------------------------------------
# the reverse pass through a whole run, sqrt-T segments

@dataclass
class Run:
    """What the reverse pass reads: the step, each step's windows (B, T+1) as trained and row
    weights (B,), the states it may start from ({step: State before that step}, 0 always) and
    the recorded weights to hold the replay to ({step: theta after step - 1})."""
    replay: Replay
    windows: list
    w: torch.Tensor  # (steps, B)
    anchors: dict
    recorded: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.windows)


@dataclass
class Pass:
    """A reverse pass's output: dw (P, steps, B) = d probe_p / d w[s, r]; extra {step: (n, P)}
    first-order effects of adding the extra windows at that step with weight 1; the largest
    |replayed - recorded| weight over the checkpoints reached (0.0: bitwise); the final theta;
    seconds of the pass; step_s: the mean seconds of a replayed step, which is a training step
    (the same ops), timed interleaved with the reverse steps, so seconds / (steps x step_s) is
    the pass's cost in training runs on the same machine under the same load."""
    dw: np.ndarray
    extra: dict
    replay_max_diff: float
    theta: list
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    step_s: float = 0.0


class _Segments:
    """States on demand: anchors kept every `every` steps as the replay passes them."""

    def __init__(self, run: Run, every: int):
        self.run, self.every, self.anchors, self.diff = run, every, dict(run.anchors), 0.0
        self.fwd_s, self.fwd_n = 0.0, 0  # the replayed steps' seconds: training steps, timed in the pass

    def advance(self, s: State, t: int) -> tuple[State, list]:
        w = self.run.w[t]
        t0 = time.perf_counter()
        s2, G = self.run.replay.step(s, t, self.run.windows[t], None if bool((w == 1).all()) else w)
        self.fwd_s, self.fwd_n = self.fwd_s + time.perf_counter() - t0, self.fwd_n + 1
        rec = self.run.recorded.get(t + 1)
        if rec is not None:
            self.diff = max(self.diff, max(float((a - b.to(a)).abs().max()) for a, b in zip(s2.theta, rec)))
        if (t + 1) % self.every == 0:
            self.anchors.setdefault(t + 1, s2)
        return s2, G

    def state_at(self, c: int) -> State:
        a = max(k for k in self.anchors if k <= c)
        s = self.anchors[a]
        for t in range(a, c):
            s, _ = self.advance(s, t)
        return s

    def segment(self, c: int, d: int) -> tuple[list, list, State]:
        """The states before steps c..d-1, their pre-clip gradients, and the state after d-1."""
        s, states, Gs = self.state_at(c), [], []
        for t in range(c, d):
            states.append(s)
            s, G = self.advance(s, t)
            Gs.append(G)
        return states, Gs, s


def default_segment(run: Run, budget: float = 2 ** 30) -> int:
    """Steps per segment: the longest stretch between anchors when its states (theta, m, v, G:
    4 parameter vectors a step) fit in `budget` bytes, so each step is replayed once; else
    ceil(sqrt(steps)) (a first pass keeps an anchor every segment: each step replayed twice)."""
    cuts = sorted(set(run.anchors) | {run.steps})
    longest = max(b - a for a, b in zip(cuts, cuts[1:]))
    per_step = 4 * sum(x.numel() * x.element_size() for x in run.anchors[0].theta)
    return longest if longest * per_step <= budget else math.isqrt(max(run.steps - 1, 0)) + 1


def reverse_pass(run: Run, probe_grads, segment: int = 0, extra: dict | None = None) -> Pass:
    """d probe / d w for every (step, row) of the run, for every probe at once.
    probe_grads(theta_T) -> [d probe_p / d theta] (P lists); segment: steps per segment
    (0: default_segment); extra {step: windows (n, T+1)}: windows whose first-order effect
    at that step is wanted, <lambda_t, g_z(theta_t)> / B."""
    t0 = time.perf_counter()
    T, extra = run.steps, extra or {}
    every = segment or default_segment(run)
    seg = _Segments(run, every)
    bounds = sorted({c for c in range(0, T, every)} | {a for a in run.anchors if a < T})
    lams, dw, out, theta_T = None, None, {}, None
    for c, d in reversed(list(zip(bounds, bounds[1:] + [T]))):
        states, Gs, last = seg.segment(c, d)
        if lams is None:  # the last segment: the probes' gradients at the end of the run
            theta_T = last.theta
            lams = [State(list(g), [torch.zeros_like(x) for x in g], [torch.zeros_like(x) for x in g])
                    for g in probe_grads(last.theta)]
            dw = np.zeros((len(lams), T, run.w.shape[1]))
        for t in range(d - 1, c - 1, -1):
            lams, dw[:, t], lam_G = run.replay.reverse(states[t - c], t, run.windows[t], run.w[t], Gs[t - c], lams)
            if t in extra:
                out[t] = extra_effects(run.replay, states[t - c].theta, extra[t], lam_G, run.w.shape[1])
        del states, Gs
    return Pass(dw, out, seg.diff, theta_T, time.perf_counter() - t0,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seg.fwd_s / max(seg.fwd_n, 1))


def extra_effects(replay: Replay, theta: list, windows: torch.Tensor, lam_G: list, B: int) -> np.ndarray:
    """(n, P): <lambda_G, g_z(theta)> / B per window z: the first-order change of each probe
    when z is trained at this step with weight 1 (its rows' share of the B x T denominator)."""
    th = [x.detach().requires_grad_() for x in theta]
    out = np.zeros((len(windows), len(lam_G)))
    with torch.enable_grad():
        for i, win in enumerate(windows):
            loss = replay.micro_loss(th, win[None], torch.ones(1, dtype=th[0].dtype)) * replay.h.micro
            g = torch.autograd.grad(loss, th)
            out[i] = [float(sum((a * b).sum() for a, b in zip(g, lg))) / B for lg in lam_G]
    return out


# -----------------------------------------------------------------------------
# a recorded run (attribution.Trajectory) as a Run

def check_replayable(cfg, on_cuda: bool) -> None:
    """One line for a run whose step this replay cannot reproduce. on_cuda: the run trained on
    a GPU (its checkpoints saved a CUDA RNG state), where --dtype=auto meant bfloat16."""
    if cfg.dropout > 0:
        raise UserError(f"--estimator=magic replays the run's steps exactly, but the run trained with "
                        f"--dropout={cfg.dropout}, whose masks the reverse pass cannot redraw (SDPA's fused "
                        "kernel draws them): use a run trained with --dropout=0")
    if not (cfg.dtype == "float32" or (cfg.dtype == "auto" and not on_cuda)):
        raise UserError(f"--estimator=magic replays float32 runs; this one trained with --dtype={cfg.dtype}"
                        f"{' on a GPU' if on_cuda else ''} (autocast): retrain with --dtype=float32")


def _load_state(model, theta: list, opt_file: Path, it: int) -> State:
    """(theta, m, v) of a checkpoint's AdamW state dict (group 0: the >= 2-D weights, group 1
    the rest, each in model.parameters() order)."""
    st = torch.load(opt_file, map_location="cpu", weights_only=True)
    params = list(model.parameters())
    order = [i for i, p in enumerate(params) if p.dim() >= 2] + [i for i, p in enumerate(params) if p.dim() < 2]
    ids = [i for g in st["param_groups"] for i in g["params"]]
    m, v = [None] * len(params), [None] * len(params)
    for key, i in zip(ids, order):
        s = st["state"][key]
        if int(s["step"]) != it:
            raise UserError(f"{opt_file} holds AdamW's state after {int(s['step'])} steps, not {it}: it is not "
                            "this checkpoint's; delete it (the replay then starts from an earlier state)")
        m[i], v[i] = s["exp_avg"].clone(), s["exp_avg_sq"].clone()
    return State(theta, m, v)


def run_fused(traj) -> bool:
    """Whether the run's AdamW was the fused kernel, from the optimizer file it saved (train.py
    keeps the last checkpoint's; runs from before model.py fused on CPU saved fused=False)."""
    for it, _ in reversed(traj.ckpts):
        opt = optimizer_path(traj.out_dir, it)
        if opt.exists():
            groups = torch.load(opt, map_location="cpu", weights_only=True)["param_groups"]
            return bool(groups[0].get("fused"))
    raise UserError(f"{traj.out_dir} keeps no optimizer file: the replay needs the last checkpoint's "
                    f"({optimizer_path(traj.out_dir, traj.ckpts[-1][0])}) to know how the run's AdamW computed")


def run_of(traj, device: str = "cpu", use_saved: bool = True, weights: np.ndarray | None = None) -> Run:
    """The Run of a Trajectory: windows as trained; weights 1, 0 where masked, the recorded
    weight where the record has weighted_rows [step, row, weight] (train.py --train_weights),
    or `weights` (steps, B) where given; the lr of each step from the config of the
    checkpoint closing its interval (a resume may change it),
    anchors at step 0 (zero moments) and, with use_saved, every checkpoint whose optimizer
    file was kept; every checkpoint's weights to hold the replay to."""
    cfg = traj.run
    ck0 = load_checkpoint(traj.ckpts[0][1])
    check_replayable(cfg, "cuda" in ck0.get("rng", {}))
    if str(device).startswith("cpu"):
        torch.set_flush_denormal(bool(getattr(cfg, "flush_denormal", False)))  # as train.py set it (process-wide)
        keep_freed_memory()  # as train.py: the replayed steps are timed as training steps (Pass.step_s)
    if traj.ckpts[0][0] != 0:
        raise UserError(f"{traj.out_dir} has no ckpt_0.pt: the replay starts from step 0")
    model = model_from_checkpoint(ck0).to(device)
    names = [n for n, _ in model.named_parameters()]
    T = traj.intervals[-1].it1
    windows, w, lrs = [None] * T, torch.zeros(T, traj.rec["batch_ids"].shape[1]), np.zeros(T)
    for iv in traj.intervals:
        ck_cfg = load_checkpoint(dict(traj.ckpts)[iv.it1])["config"]
        for j, s in enumerate(iv.steps):
            windows[s] = tokens([traj.items[i].tokens for i in iv.win[j]], device)
            w[s] = torch.from_numpy(iv.keep[j].astype(np.float32))
            lrs[s] = get_lr(int(s), _Cfg(ck_cfg))
    for s, r, x in np.asarray(traj.rec.get("weighted_rows", np.zeros((0, 3)))):  # train.py --train_weights
        if int(s) < T:
            w[int(s), int(r)] = float(np.float32(x))
    if weights is not None:
        w = torch.as_tensor(np.asarray(weights, np.float32)[:T])
    hyper = Hyper(lrs, cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip, cfg.gradient_accumulation_steps,
                  fused=run_fused(traj))
    recorded, anchors = {}, {}
    for it, p in traj.ckpts:
        sd = load_checkpoint(p)["model"]
        recorded[it] = [sd[n].to(device) for n in names]
        opt = optimizer_path(traj.out_dir, it)
        if it == 0:
            anchors[0] = State([x.clone() for x in recorded[0]], [torch.zeros_like(x) for x in recorded[0]],
                               [torch.zeros_like(x) for x in recorded[0]])
        elif use_saved and it < T and opt.exists():
            anchors[it] = _load_state(model, [x.clone() for x in recorded[it]], opt, it)
    return Run(Replay(model, hyper), windows, w.to(device), anchors, recorded)


def tokens(windows: list, device: str = "cpu") -> torch.Tensor:
    """(n, T+1) int64 on device from token arrays (the index stores uint16)."""
    return torch.from_numpy(np.stack(windows).astype(np.int64)).to(device)


class _Cfg:
    def __init__(self, d: dict):
        self.__dict__.update(d)


def item_loss(replay: Replay, theta: list, tokens, weight=None) -> torch.Tensor:
    """A probe's (weighted) mean token loss, as attribute.item_losses measures it."""
    t = torch.as_tensor(np.asarray(tokens, np.int64), device=theta[0].device)[None]
    logits = replay.logits(theta, t[:, :-1])
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).transpose(1, 2), t[:, 1:],
                         reduction="none")[0]
    wt = torch.ones_like(ce) if weight is None else torch.as_tensor(np.asarray(weight), dtype=ce.dtype,
                                                                    device=ce.device)
    return (ce * wt).sum() / wt.sum()


def probe_gradients(replay: Replay, probes: list):
    """probe_grads for reverse_pass: each probe's loss gradient at theta_T."""
    def grads(theta):
        th = [x.detach().requires_grad_() for x in theta]
        with torch.enable_grad():
            return [list(torch.autograd.grad(item_loss(replay, th, it.tokens, it.weight), th)) for it in probes]
    return grads


def metagradients(traj, probes: list, device: str = "cpu", segment: int = 0, extra: dict | None = None,
                  mean: bool = False, weights: np.ndarray | None = None) -> Pass:
    """One reverse pass through the run `traj` (an attribution.Trajectory) for the probes
    (Items: tokens, weight): Pass.dw (P, steps, B) = d probe_p / d w[s, r] (mean: one
    probe, their mean). Every checkpoint the replay reaches is compared with it
    (Pass.replay_max_diff); extra {step: windows (n, T+1)} as reverse_pass."""
    run = run_of(traj, device, weights=weights)
    bad = sorted(t for t in (extra or {}) if not 0 <= t < run.steps)
    if bad:
        raise UserError(f"step {bad[0]} is not a step of {traj.out_dir} (it trained steps 0..{run.steps - 1})")
    grads = probe_gradients(run.replay, probes)
    if mean:
        def one(theta):
            gs = grads(theta)
            return [[sum(g[i] for g in gs) / len(gs) for i in range(len(gs[0]))]]
        return reverse_pass(run, one, segment, extra)
    return reverse_pass(run, grads, segment, extra)


def table_path(cache_dir, traj, probes: list) -> Path:
    """<cache_dir>/magic_<hash>.npz: the (step, row) table of these probes on this run (the
    hash covers the probes' content and the last checkpoint's file signature)."""
    h = hashlib.sha1("".join(it.key() for it in probes).encode())
    h.update(repr(file_signature(traj.last)).encode())
    return Path(cache_dir) / f"magic_{h.hexdigest()[:16]}.npz"


def cached_table(traj, probes: list, cache_dir, device: str = "cpu", segment: int = 0) -> dict:
    """The run's (step, row) table for the probes, computed once and kept beside the run
    (atomic): dw (P, steps, B), batch_ids (steps, B), keep (steps, B), replay_max_diff,
    seconds, peak_rss_mb."""
    path = table_path(cache_dir, traj, probes)
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    res = metagradients(traj, probes, device, segment)
    T = res.dw.shape[1]
    keep = np.concatenate([iv.keep for iv in traj.intervals])[:T]
    table = {"dw": res.dw, "batch_ids": traj.rec["batch_ids"][:T], "keep": keep,
             "replay_max_diff": np.float64(res.replay_max_diff), "seconds": np.float64(res.seconds),
             "peak_rss_mb": np.float64(res.peak_rss_mb), "cost_runs": np.float64(res.seconds / (T * res.step_s))}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **table)
    print(f"magic: {len(probes)} probes through {T} steps in {res.seconds:.1f} s = {table['cost_runs']:.2f} training "
          f"runs (its steps, timed in the pass), peak rss {res.peak_rss_mb:.0f} MB; replay vs checkpoints: max |diff| "
          f"{res.replay_max_diff:.3g}" +
          (" (bitwise)" if res.replay_max_diff == 0 else "") + f"; table {path}")
    return table


def batch_scores(traj, table: dict) -> np.ndarray:
    """(n_batches, P) over traj.batches: - sum of dw over each batch's kept occurrences
    (> 0 = training on it lowered the probe's loss, the estimators' sign)."""
    dw, ids, keep = table["dw"], table["batch_ids"], table["keep"]
    out = np.zeros((len(traj.batches), dw.shape[0]))
    s, r = np.nonzero(keep)
    rows = np.array([traj.row_of[int(b)] for b in ids[s, r]], np.int64)
    np.add.at(out, rows, -dw[:, s, r].T)
    return out


# -----------------------------------------------------------------------------
# order: the first-order effect of a batch at any step

def step_effect(ctx, batch_ids, steps, device: str = "cpu") -> np.ndarray:
    """(n_batches, n_steps): the first-order change of the mean probe loss from training
    each batch (its plain window) at each step with weight 1, one more row of that step:
    <lambda_t, g_z(theta_t)> / B. Where in the run does a batch matter most."""
    data = ctx.traj.data
    wins = tokens([data.window(int(b)) for b in batch_ids], device)
    res = metagradients(ctx.traj, ctx.probes, device, extra={int(t): wins for t in steps}, mean=True)
    return np.stack([res.extra[int(t)][:, 0] for t in steps], axis=1)


def move_effect_magic(ctx, move_sets: list, device: str = "cpu") -> np.ndarray:
    """(n_sets,): the first-order change of the mean probe loss when the batches of each set
    move, [(batch id, old step, new step)], from one reverse pass (> 0: the loss rises)."""
    data, want = ctx.traj.data, {}
    for ms in move_sets:
        for z, a, b in ms:
            for s in (a, b):
                want.setdefault(int(s), {}).setdefault(int(z), len(want.get(int(s), {})))
    extra = {s: tokens([data.window(z) for z in zs], device) for s, zs in want.items()}
    res = metagradients(ctx.traj, ctx.probes, device, extra=extra, mean=True) if extra else None
    return move_sum(move_sets, lambda z, s: res.extra[int(s)][want[int(s)][int(z)], 0])


def move_sum(move_sets: list, effect) -> np.ndarray:
    """(n_sets,) sum over each set's moves (z, a, b) of effect(z, b) - effect(z, a): z out of
    step a (its row's weight 1 -> 0) and into step b (a row of weight 1 more), to first order;
    effect(z, t) = <lambda_t, g_z(theta_t)> / B."""
    return np.array([sum((effect(z, b) - effect(z, a) for z, a, b in ms), 0.0) for ms in move_sets])


# -----------------------------------------------------------------------------
# planted truth: the metagradient against central finite differences in float64

def planted_truth(dim: int = 16, n_layers: int = 2, steps: int = 20, B: int = 4, T: int = 8, pairs: int = 20,
                  vocab: int = 32, grad_clip: float = 0.5, seed: int = 0, h: float = 1e-6) -> dict:
    """A tiny Transformer trained `steps` AdamW steps in float64 on random windows (warmup
    over the first quarter, clipping at grad_clip: active where the norm exceeds it); dw of
    a probe's loss by the reverse pass against (f(w + h e) - f(w - h e)) / 2h at `pairs`
    random (step, row) pairs, each replayed from the stored state before its step.
    {rel_err (pairs,), dw, fd, pairs, clipped (share of steps whose norm exceeded the clip)}."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=2, n_kv_heads=1, vocab_size=vocab,
                                  max_seq_len=T)).double()
    warm = max(1, steps // 4)
    lrs = np.array([3e-3 * min(1.0, (i + 1) / (warm + 1)) for i in range(steps)])
    rp = Replay(model, Hyper(lrs, 0.9, 0.95, 0.1, grad_clip, micro=2))
    g = torch.Generator().manual_seed(seed + 1)
    wins = [torch.randint(0, vocab, (B, T + 1), generator=g) for _ in range(steps)]
    probe = torch.randint(0, vocab, (T + 1,), generator=g)
    zeros = [torch.zeros_like(p) for p in model.parameters()]
    s0 = State([p.detach().clone() for p in model.parameters()], zeros, [z.clone() for z in zeros])
    W = torch.ones(steps, B, dtype=torch.float64)
    run = Run(rp, wins, W, {0: s0})
    res = reverse_pass(run, probe_gradients(rp, [_Probe(probe)]), segment=steps)  # one segment: keep every state
    states, Gs, _ = _Segments(run, steps).segment(0, steps)
    clipped = np.mean([float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in G])))
                       > grad_clip for G in Gs])
    rng = np.random.default_rng(seed)
    chosen = [(int(rng.integers(steps)), int(rng.integers(B))) for _ in range(pairs)]
    fd = np.array([_central_difference(rp, states, wins, W, probe, t, r, h) for t, r in chosen])
    dw = np.array([res.dw[0, t, r] for t, r in chosen])
    return {"rel_err": np.abs(dw - fd) / np.abs(fd), "dw": dw, "fd": fd, "pairs": chosen, "clipped": clipped}


@dataclass
class _Probe:
    tokens: np.ndarray
    weight: np.ndarray | None = None


def _central_difference(rp: Replay, states: list, wins: list, W: torch.Tensor, probe, t: int, r: int,
                        h: float) -> float:
    vals = []
    for sign in (1, -1):
        Wx = W.clone()
        Wx[t, r] += sign * h
        s = states[t]
        for u in range(t, len(wins)):
            s, _ = rp.step(s, u, wins[u], Wx[u])
        vals.append(float(item_loss(rp, s.theta, probe)))
    return (vals[0] - vals[1]) / (2 * h)

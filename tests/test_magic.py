"""prebias/magic.py: the replayed step is train.py's step bitwise, the replay reproduces a
recorded run, the metagradient is the finite difference (float64), order predictions are
the exact first-order change, and an empty move predicts zero."""

import types

import numpy as np
import pytest
import torch

import train
from model import ModelArgs, Transformer
from prebias import attribution as A
from prebias import magic as M


def fresh_state(model) -> M.State:
    zeros = [torch.zeros_like(p) for p in model.parameters()]
    return M.State([p.detach().clone() for p in model.parameters()], zeros, [z.clone() for z in zeros])


@pytest.mark.parametrize("fused", [True, False])
def test_the_pure_step_is_train_py_step_bitwise(fused):
    """Six steps of train.Trainer.train_step (micro-batches, a masked step, clipping, AdamW
    with decay) against Replay.step from the same weights: theta, m and v bitwise equal,
    with the fused AdamW that model.py uses and with the single-tensor loop older runs used."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)
    model = Transformer(args)
    ref = Transformer(args)
    ref.load_state_dict(model.state_dict())
    opt = ref.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    assert opt.param_groups[0]["fused"]  # what train.py trains with on CPU
    if not fused:
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)  # the single-tensor loop
    B, micro, steps = 8, 2, 6
    lrs = np.array([1e-2 * (i + 1) / 4 for i in range(steps)])
    rp = M.Replay(model, M.Hyper(lrs, 0.9, 0.95, 0.1, 1.0, micro, fused=fused))
    s = fresh_state(model)
    trainer = types.SimpleNamespace(rank=0, world=1, micro_steps=micro, device="cpu", ddp=False, model=ref,
                                    ctx=torch.autocast("cpu", enabled=False), cfg=types.SimpleNamespace(grad_clip=1.0),
                                    scaler=torch.amp.GradScaler(enabled=False), optimizer=opt)
    g = torch.Generator().manual_seed(1)
    clipped = 0
    for t in range(steps):
        win = torch.randint(0, 64, (B, 17), generator=g)
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        masked = np.zeros(B, bool)
        masked[[1, 5]] = t == 3
        train.Trainer.train_step(trainer, win.numpy(), (~masked).astype(np.float32) if masked.any() else None)
        s, G = rp.step(s, t, win, torch.from_numpy((~masked).astype(np.float32)) if masked.any() else None)
        clipped += float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in G]))) > 1.0
        st = opt.state_dict()["state"]
        order = [i for i, p in enumerate(ref.parameters()) if p.dim() >= 2] + \
                [i for i, p in enumerate(ref.parameters()) if p.dim() < 2]
        for key, i in enumerate(order):
            assert torch.equal(st[key]["exp_avg"], s.m[i]) and torch.equal(st[key]["exp_avg_sq"], s.v[i])
        for a, b in zip(s.theta, ref.parameters()):
            assert torch.equal(a, b.detach()), f"step {t}: max diff {float((a - b).abs().max())}"
    assert clipped >= 1  # the clip acted on at least one step


def test_replay_reproduces_the_recorded_run(tiny_run):
    """From ckpt_0 with zero moments, every recorded checkpoint bitwise (CPU, float32)."""
    traj = A.Trajectory(tiny_run.out_dir)
    run = M.run_of(traj, use_saved=False)
    assert set(run.anchors) == {0} and len(run.recorded) >= 6
    seg = M._Segments(run, every=run.steps)
    seg.state_at(run.steps)
    assert seg.diff == 0.0
    run.recorded[8] = [x + 1e-6 for x in run.recorded[8]]  # a recorded state that differs is seen
    seg = M._Segments(run, every=run.steps)
    seg.state_at(run.steps)
    assert seg.diff == pytest.approx(1e-6, rel=0.05)


def test_metagradient_equals_central_finite_differences_in_float64():
    """dim 16, 2 layers, 16 steps, warmup, clipping on every step: 20 random (step, row)
    pairs, relative error <= 1e-4 (measured ~1e-7)."""
    r = M.planted_truth(steps=16, pairs=20, seed=3)
    assert r["clipped"] == 1.0
    assert len(r["pairs"]) == 20 and np.all(np.abs(r["fd"]) > 1e-6)
    assert r["rel_err"].max() <= 1e-4, (r["rel_err"], r["pairs"])



def autograd_reverse_update(rp, s, G, t, lam):
    """The VJP of Replay.update (clip + AdamW) by autograd: what the written-out one must equal."""
    src = [x.detach().requires_grad_() for x in s.flat()]
    Gs = [g.detach().requires_grad_() for g in G]
    n = len(s.theta)
    out = rp.update(M.State(src[:n], src[n:2 * n], src[2 * n:]), Gs, t).flat()
    d = torch.autograd.grad(out, src + Gs, lam.flat())
    return list(d[:3 * n]), list(d[3 * n:])


@pytest.mark.parametrize("clip", [0.05, 1e3, 0.0])
def test_the_written_out_update_vjp_is_autograds(clip):
    """Replay._reverse_update against autograd through Replay.update, float64, two probes:
    the clip active (0.05), inactive (1e3) and off (0), weight decay on the >= 2-D tensors,
    and coordinates whose second moment is 0 (sqrt0's zero derivative)."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32, max_seq_len=8)).double()
    rp = M.Replay(model, M.Hyper(np.array([3e-3, 2e-3, 1e-3]), 0.9, 0.95, 0.1, clip, micro=1))
    ps = [p.detach() for p in model.parameters()]
    s = M.State([p.clone() for p in ps], [torch.randn_like(p) * 1e-3 for p in ps], [torch.rand_like(p) * 1e-6 for p in ps])
    G = [torch.randn_like(p) * 0.1 for p in ps]
    s.v[0][:3] = 0.0  # rows of the embedding that never had a gradient
    G[0][:3] = 0.0
    lams = [M.State(*[[torch.randn_like(p) for p in ps] for _ in range(3)]) for _ in range(2)]
    back, lam_G = rp._reverse_update(s, G, 2, lams)
    norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in G])))
    assert (norm > clip) == (clip == 0.05) or clip == 0.0
    for p, lam in enumerate(lams):
        ref_state, ref_G = autograd_reverse_update(rp, s, G, 2, lam)
        for a, b in zip(back[p].flat() + lam_G[p], ref_state + ref_G):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * float(b.abs().max() + 1)), float((a - b).abs().max())

class QuadReplay(M.Replay):
    """A toy quadratic: row z's token losses are 0.5 |x - c_z|^2 (the same on each token)."""
    plain = False

    def __init__(self, model, hyper, centers):
        super().__init__(model, hyper)
        self.centers = centers

    def token_loss(self, theta, win):
        ell = 0.5 * ((theta[0][None] - self.centers[win[:, 0]]) ** 2).sum((1, 2))  # (bs,)
        return ell[:, None].expand(-1, win.shape[1] - 1)


def quad_reference(x0, centers, ids, hyper, probe_c, move, eps):
    """The toy run written out by hand (AdamW, clip, weight decay), z moved by eps:
    its row at (s, r) weighs 1 - eps and z joins step t with weight eps; the probe's loss."""
    (z, s, r), t = move
    x, m, v = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
    B = ids.shape[1]
    for u in range(len(ids)):
        wts = torch.ones(B, dtype=torch.float64)
        wts = wts - eps * torch.nn.functional.one_hot(torch.tensor(r), B) if u == s else wts
        g = sum(wts[k] * (x - centers[ids[u, k]]) for k in range(B)) / B
        g = g + eps * (x - centers[z]) / B if u == t else g
        g = g * torch.clamp(hyper.grad_clip / (g.norm() + 1e-6), max=1.0)
        lr, n = hyper.lrs[u], u + 1
        x = x * (1 - lr * hyper.weight_decay)
        m = hyper.beta1 * m + (1 - hyper.beta1) * g
        v = hyper.beta2 * v + (1 - hyper.beta2) * g * g
        x = x - lr / (1 - hyper.beta1 ** n) * m / (v.sqrt() / (1 - hyper.beta2 ** n) ** 0.5 + hyper.eps)
    return 0.5 * ((x - probe_c) ** 2).sum()


def test_order_prediction_is_the_exact_first_order_change_on_a_toy_quadratic():
    g = torch.Generator().manual_seed(0)
    S, B, V = 8, 3, 6
    centers = torch.randn(V, 2, 3, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (S, B), generator=g)
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64))
    hyper = M.Hyper(np.array([0.05 * min(1, (i + 1) / 3) for i in range(S)]), 0.9, 0.95, 0.1, 0.8, micro=1)
    rp = QuadReplay(model, hyper, centers)
    wins = [ids[u][:, None].expand(-1, 3).contiguous() for u in range(S)]  # (B, T+1): the id in every position
    probe_c = torch.randn(2, 3, generator=g, dtype=torch.float64)
    z, s, r, t = int(ids[1, 2]), 1, 2, 6  # batch z moves from step 1 (row 2) to step 6
    run = M.Run(rp, wins, torch.ones(S, B, dtype=torch.float64), {0: fresh_state(model)})
    res = M.reverse_pass(run, lambda th: [[th[0] - probe_c]], segment=3,
                         extra={s: wins[s][r:r + 1], t: wins[s][r:r + 1]})
    pred = M.move_sum([[(z, s, t)]], lambda zz, u: res.extra[u][0, 0])[0]
    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    exact = torch.autograd.grad(quad_reference(model.x.detach(), centers, ids, hyper, probe_c, ((z, s, r), t), eps),
                                eps)[0]
    assert abs(float(exact)) > 1e-4
    assert pred == pytest.approx(float(exact), rel=1e-9)
    assert res.extra[s][0, 0] == pytest.approx(res.dw[0, s, r], rel=1e-12)  # out of step s = minus its weight's dw


def test_an_empty_move_predicts_zero_and_the_table_scores_batches(tiny_run):
    """No move, or a batch moved to its own step: exactly 0; the estimator's batch scores are
    minus the (step, row) table summed over each batch's occurrences, and the table is kept."""
    traj = A.Trajectory(tiny_run.out_dir)
    probes = [A.Item(w) for w in traj.data.windows(traj.data.val_ids[:2])]
    ctx = A.Context(traj, probes, A.GradStore(tiny_run.out_dir / "attribution" / "cache", 0, "rademacher", 0),
                    cache_dir=tiny_run.out_dir / "attribution")
    z, s = int(traj.rec["batch_ids"][3, 1]), 3
    pred = M.move_effect_magic(ctx, [[], [(z, s, s)], [(z, s, 20)]])
    assert pred[0] == 0.0 and pred[1] == 0.0 and pred[2] != 0.0
    S, _ = A.run_estimator("magic", ctx)
    table = M.cached_table(traj, probes, ctx.cache_dir)
    assert M.table_path(ctx.cache_dir, traj, probes).exists() and table["replay_max_diff"] == 0.0
    b = traj.row_of[z]
    occ = np.argwhere(table["batch_ids"] == z)
    assert S.shape == (len(traj.batches), 2)
    assert S[b] == pytest.approx(-sum(table["dw"][:, i, j] for i, j in occ), rel=1e-12)
    curve = M.step_effect(ctx, [z], [s, 20])  # z's effect at its own step is its row's dw (mean probe)
    assert curve.shape == (1, 2) and curve[0, 0] == pytest.approx(table["dw"][:, s, 1].mean(), rel=1e-3)


def test_runs_it_cannot_replay_are_refused_with_one_line():
    from prebias.common import UserError
    M.check_replayable(types.SimpleNamespace(dropout=0.0, dtype="auto"), on_cuda=False)  # float32 on CPU
    for cfg, on_cuda, says in ((dict(dropout=0.1, dtype="float32"), False, "--dropout=0.1"),
                               (dict(dropout=0.0, dtype="bfloat16"), False, "--dtype=bfloat16"),
                               (dict(dropout=0.0, dtype="auto"), True, "--dtype=auto on a GPU")):
        with pytest.raises(UserError, match=says):
            M.check_replayable(types.SimpleNamespace(**cfg), on_cuda)


def test_a_masked_run_replays_bitwise_and_its_kept_optimizer_states_are_anchors(tiny_data, tmp_path):
    """--train_mask (the weighted path) and --keep_optimizer: the replay from step 0 meets every
    checkpoint bitwise, and the saved AdamW states (theta, m, v) equal the replayed ones."""
    from conftest import TinyRun
    r = TinyRun(*tiny_data, tmp_path / "out")
    args = dict(max_iters=6, eval_interval=3, batch_size=2, gradient_accumulation_steps=2, n_layers=1, dim=16,
                n_heads=2, n_kv_heads=1, keep_optimizer=True)
    train.main(r.train_args(**args, out_dir=tmp_path / "plain"))
    masked = np.load(tmp_path / "plain" / "batch_ids.npy")[4, 1]
    np.save(tmp_path / "mask.npy", np.array([masked]))
    train.main(r.train_args(**args, train_mask=tmp_path / "mask.npy"))
    traj = A.Trajectory(r.out_dir)
    run0 = M.run_of(traj, use_saved=False)
    assert float(run0.w[4, 1]) == 0.0 and int((run0.w == 0).sum()) == int((traj.rec["batch_ids"] == masked).sum())
    seg = M._Segments(run0, every=1)  # every replayed state kept
    seg.state_at(run0.steps)
    assert seg.diff == 0.0
    saved = M.run_of(traj).anchors
    assert set(saved) == {0, 1, 2, 3}
    for k in (1, 2, 3):
        assert all(torch.equal(a, b) for a, b in zip(saved[k].flat(), seg.anchors[k].flat()))

"""attribute.py and prebias/attribution.py: the projection preserves gradient dot products;
every estimator agrees with a hand computation on a 1-layer run (TracIn sums over the
recorded intervals, a batch trained twice counts twice, a masked row counts nothing);
EK-FAC through Kronfluence equals a hand EK-FAC; LDS of exact influence on ridge
regression is ~1 and of noise ~0; the order-aware estimate of a move equals the exact
first-order change on a toy quadratic; retrains in place reproduce the run bitwise; the
cache gives identical results; bad probes are one line; the validations run end to end."""

import importlib.util
import re
import shutil
import types

import numpy as np
import pandas as pd
import pytest
import torch

import attribute
import train
from conftest import TinyRun, refused
from model import ModelArgs, Transformer
from prebias import attribution as A
from prebias import checkpoint
from prebias import smoothness as SM
from prebias.common import UserError
from prebias.data import BatchData
from prebias.schedule import get_lr

HAVE_KRONFLUENCE = importlib.util.find_spec("kronfluence") is not None


def test_projection_preserves_dot_products():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=16))
    x = torch.randint(0, 64, (6, 9))
    G = A.batch_grads(m, x.numpy())
    exact = (G @ G.T).double()
    proj = A.Projector([p.numel() for p in m.parameters()], 8192, "gaussian", seed=1)
    P = proj(G)
    approx = P @ P.T
    assert np.corrcoef(exact.flatten(), approx.flatten())[0, 1] > 0.99
    np.testing.assert_allclose(np.diag(approx), np.diag(exact), rtol=0.1)
    assert torch.equal(P, proj(G))  # seeded: the same projection every call
    rad = A.Projector([p.numel() for p in m.parameters()], 8192, "rademacher", seed=1)(G)
    np.testing.assert_allclose(np.diag(rad @ rad.T), np.diag(exact), rtol=0.1)


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("attr") / "out"
    r = TinyRun(*tiny_data, out)
    train.main(r.train_args(max_iters=6, eval_interval=4, batch_size=2, gradient_accumulation_steps=1))
    return r


@pytest.fixture(scope="module")
def one_layer(tiny_data, tmp_path_factory):
    """A 1-layer run with every checkpoint's optimizer moments, one batch masked at step 4."""
    out = tmp_path_factory.mktemp("attr1") / "out"
    r = TinyRun(*tiny_data, out)
    args = dict(max_iters=6, eval_interval=3, batch_size=2, gradient_accumulation_steps=1, n_layers=1, dim=16,
                n_heads=2, n_kv_heads=1, keep_optimizer=True)
    train.main(r.train_args(**args, out_dir=out.parent / "probe"))
    masked = np.load(out.parent / "probe" / "batch_ids.npy")[4, 1]
    np.save(out.parent / "mask.npy", np.array([masked]))
    train.main(r.train_args(**args, train_mask=out.parent / "mask.npy"))
    return r, int(masked)


def by_hand_grads(model, data, ids) -> torch.Tensor:
    return torch.stack([A.flat_grad(model, *(lambda w: (w[:, :-1], w[:, 1:]))(torch.from_numpy(data.windows([b]))))
                        for b in ids]).double()


def test_influence_is_the_lr_weighted_sum_over_the_recorded_intervals(run, tmp_path):
    # make one batch come twice: rewrite the last interval so step 5 repeats step 4's first id
    out = tmp_path / "twice"
    shutil.copytree(run.out_dir, out)
    p = checkpoint.ckpt_path(out, 6)
    ck = checkpoint.load_checkpoint(p, mmap=False)
    ids = ck["batch_ids"].clone()
    ids[1, 0] = ids[0, 0]
    ck["batch_ids"] = ids
    checkpoint.save_checkpoint(ck, p)
    df, _ = attribute.influence(attribute.AttributeConfig(out_dir=str(out), probe="val", d=0, n_val=2))
    # by hand, with exact gradients at the checkpoint that starts each interval
    cfg = types.SimpleNamespace(**checkpoint.run_config(out))
    data = BatchData(run.data_dir, 512, 64)
    found = checkpoint.list_checkpoints(out)
    want = {}
    for (it0, p0), (it1, p1) in zip(found, found[1:]):
        model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(p0))
        v = torch.from_numpy(data.windows(data.val_ids[:2]))
        gp = A.flat_grad(model, v[:, :-1], v[:, 1:]).double()
        for s, row in zip(range(it0, it1), checkpoint.load_checkpoint(p1)["batch_ids"].numpy()):
            for bid in row:
                w = torch.from_numpy(data.windows([bid]))
                g = A.flat_grad(model, w[:, :-1], w[:, 1:]).double()
                want[int(bid)] = want.get(int(bid), 0.0) + get_lr(s, cfg) * float(g @ gp)
    got = dict(zip(df["batch_id"], df["influence"]))
    assert set(got) == set(want)
    for bid in want:
        assert got[bid] == pytest.approx(want[bid], rel=1e-6, abs=1e-12)
    twice = int(ids[0, 0])
    assert int(df.loc[df["batch_id"] == twice, "n_trained"].iloc[0]) == 2


def test_each_estimator_agrees_with_a_hand_computation(one_layer):
    r, masked = one_layer
    cfg = attribute.AttributeConfig(out_dir=str(r.out_dir), probe="val", d=0, n_val=3)
    ctx, _ = attribute.context(cfg)
    traj = ctx.traj
    data = traj.data
    ids = np.load(r.out_dir / "batch_ids.npy")
    assert masked not in traj.batches.tolist() and masked in ids  # trained once, with weight 0: no score
    found = checkpoint.list_checkpoints(r.out_dir)
    vals = data.windows(data.val_ids[:3])

    def probe_grads(model):
        return torch.stack([A.flat_grad(model, torch.from_numpy(v[None, :-1]), torch.from_numpy(v[None, 1:]))
                            for v in vals]).double()
    want = {"tracin": np.zeros((len(traj.batches), 3)), "tracin_adam": np.zeros((len(traj.batches), 3))}
    for (it0, p0), (it1, _) in zip(found, found[1:]):
        model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(p0))
        opt = torch.load(checkpoint.optimizer_path(r.out_dir, it0 or it1), weights_only=True)
        # Adam's v_hat by hand, parameter by parameter in the optimizer's group order
        params = list(model.parameters())
        order = [p for p in params if p.dim() >= 2] + [p for p in params if p.dim() < 2]
        D = {id(p): 1 / ((opt["state"][i]["exp_avg_sq"].double() / (1 - 0.95 ** float(opt["state"][i]["step"])))
                         .sqrt() + 1e-8) for i, p in enumerate(order)}
        Dflat = torch.cat([D[id(p)].reshape(-1) for p in params])
        Q = probe_grads(model)
        for s in range(it0, it1):
            for row, b in enumerate(ids[s]):
                if int(b) == masked:
                    continue
                g = by_hand_grads(model, data, [b])[0]
                i = list(traj.batches).index(int(b))
                want["tracin"][i] += get_lr(s, traj.run) * (Q @ g).numpy()
                want["tracin_adam"][i] += get_lr(s, traj.run) * (Q @ (Dflat * g)).numpy()
    last = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(found[-1][1]))
    want["grad_dot"] = (by_hand_grads(last, data, traj.batches) @ probe_grads(last).T).numpy()
    for name in ("tracin", "tracin_adam", "grad_dot"):
        got, _ = A.run_estimator(name, ctx)
        np.testing.assert_allclose(got, want[name], rtol=1e-6, atol=1e-12, err_msg=name)
    # trak on projected gradients: Phi (Phi^T Phi + lambda I)^-1 q, averaged over checkpoints 3 and 6
    d = 8
    ctx8, _ = attribute.context(attribute.AttributeConfig(out_dir=str(r.out_dir), probe="val", d=d, n_val=3))
    trak = np.zeros((len(traj.batches), 3))
    for it in (3, 6):
        model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(checkpoint.ckpt_path(r.out_dir, it)))
        P = A.Projector([p.numel() for p in model.parameters()], d, "rademacher", 0)
        Phi, Q = P(by_hand_grads(model, data, traj.batches)).numpy(), P(probe_grads(model)).numpy()
        K = Phi.T @ Phi
        trak += Phi @ np.linalg.inv(K + 0.01 * np.trace(K) / d * np.eye(d)) @ Q.T / 2
    np.testing.assert_allclose(A.run_estimator("trak", ctx8)[0], trak, rtol=1e-6)


@pytest.mark.skipif(not HAVE_KRONFLUENCE, reason="kronfluence (an optional extra) is not installed")
def test_ekfac_through_kronfluence_equals_a_hand_ekfac(tmp_path):
    """EK-FAC (George et al. 2018) per Linear module: eigenbases of the activation and
    output-gradient covariances, eigenvalues refitted to the per-example gradients,
    damped; score = <preconditioned probe gradient, training gradient>."""
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32, max_seq_len=16))
    rng = np.random.default_rng(0)
    train_t = [rng.integers(0, 32, 9) for _ in range(10)]
    probes = [A.Item(rng.integers(0, 32, 9)) for _ in range(2)]
    got = A.kronfluence_scores(m, train_t, probes, tmp_path / "kf", damping=1e-3, empirical_fisher=True, batch_size=5)
    mods = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]

    def capture(tokens, mean):
        """{module: (activations (T, in), output gradients (T, out))} of one sequence's loss."""
        acts, outs, hooks = {}, {}, []

        def hook(name):
            def fn(mod, inputs, output):
                acts[name] = inputs[0][0].detach()
                output.register_hook(lambda g: outs.__setitem__(name, g[0].detach()))
            return fn
        for n, mod in mods:
            hooks.append(mod.register_forward_hook(hook(n)))
        t = torch.as_tensor(tokens)[None]
        ce = torch.nn.functional.cross_entropy(m(t[:, :-1])[0].float().transpose(1, 2), t[:, 1:], reduction="none")
        (ce.mean() if mean else ce.sum()).backward()
        for h in hooks:
            h.remove()
        m.zero_grad()
        return {n: (acts[n].double(), outs[n].double()) for n, _ in mods}
    tr = [capture(t, False) for t in train_t]
    qs = [capture(p.tokens, True) for p in probes]
    want = np.zeros((2, 10))
    for n, _ in mods:
        a_cov = sum(c[n][0].T @ c[n][0] for c in tr)
        g_cov = sum(c[n][1].T @ c[n][1] for c in tr)
        QA, QS = torch.linalg.eigh(a_cov)[1], torch.linalg.eigh(g_cov)[1]
        G = [c[n][1].T @ c[n][0] for c in tr]  # per-example gradient (out, in)
        lam = sum((QS.T @ g @ QA) ** 2 for g in G) / len(G)
        for j, q in enumerate(qs):
            pre = QS @ ((QS.T @ (q[n][1].T @ q[n][0]) @ QA) / (lam + 1e-3)) @ QA.T
            want[j] += np.array([float((pre * g).sum()) for g in G])
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)


def test_lds_of_exact_influence_on_ridge_regression_is_about_one():
    """Ridge regression retrained in closed form on 50 half subsets: the influence function
    g_probe^T H^-1 g_i predicts each subset's probe losses almost perfectly (LDS > 0.98),
    noise does not (its interval holds 0), and the interval holds the estimate."""
    rng = np.random.default_rng(0)
    n, d, P, lam = 100, 3, 20, 1000.0
    X, Xq = rng.normal(size=(n, d)), rng.normal(size=(P, d))
    th = rng.normal(size=d)
    y, yq = X @ th + rng.normal(size=n), Xq @ th + rng.normal(size=P)

    def fit(keep):
        return np.linalg.solve(X[keep].T @ X[keep] + lam * np.eye(d), X[keep].T @ y[keep])
    t = fit(np.ones(n, bool))
    gi, gq = (X @ t - y)[:, None] * X, (Xq @ t - yq)[:, None] * Xq
    exact = gi @ np.linalg.solve(X.T @ X + lam * np.eye(d), gq.T)  # (n, P), > 0: removing it raises the loss
    kept = attribute.lds_subsets(np.arange(n), 50, 0.5, seed=1)
    measured = np.stack([0.5 * (Xq @ fit(k) - yq) ** 2 for k in kept])
    r = A.lds(exact, kept, measured)
    assert r["lds"] > 0.98 and r["lo"] <= r["lds"] <= r["hi"] and r["lo"] > 0.97
    assert A.lds(-exact, kept, measured)["lds"] < -0.98  # the sign convention: > 0 = helpful
    noise = A.lds(rng.normal(size=exact.shape), kept, measured)
    assert noise["lo"] < 0 < noise["hi"] and abs(noise["lds"]) < 0.15


def test_the_order_aware_estimate_equals_the_exact_first_order_change_on_a_quadratic():
    """SGD on quadratic batch losses 0.5 (theta - c_z)^T A (theta - c_z), B rows a step, a
    quadratic probe: swapping batches between an early and a late step changes theta_T
    affinely, so the predicted change is exactly grad f(theta_T) . (theta'_T - theta_T);
    the measured change differs from it only by the second-order term."""
    rng = np.random.default_rng(3)
    dim, T, B, n = 4, 12, 2, 40
    Am = torch.from_numpy(np.diag(rng.uniform(0.5, 2, dim)))
    c = torch.from_numpy(rng.normal(size=(n, dim)))
    cstar = torch.from_numpy(rng.normal(size=dim))
    order = rng.choice(n, (T, B), replace=False)
    lr = lambda t: 0.1 * (1 - t / (2 * T))  # noqa: E731 (a decaying schedule: moves change the lr a batch gets)

    def run(o):
        th, traj = torch.zeros(dim, dtype=torch.float64), []
        for t in range(T):
            traj.append(th)
            th = th - lr(t) * sum(Am @ (th - c[z]) for z in o[t]) / B
        return th, traj
    probe = lambda th: 0.5 * float((th - cstar) @ (th - cstar))  # noqa: E731
    thT, traj = run(order)
    new = order.copy()
    new[1, 0], new[10, 1] = order[10, 1], order[1, 0]  # a batch of step 1 trades places with one of step 10
    moves = attribute.moves_of(order, new)
    assert sorted(moves) == sorted([(int(order[10, 1]), 10, 1), (int(order[1, 0]), 1, 10)])
    adj = A.unrolled_adjoints(T, lr, lambda t, x: Am @ x, lambda t: torch.ones(dim, dtype=torch.float64),
                              thT - cstar, {2, 11})
    pred = A.move_prediction(moves, lr, B, lambda z, s: Am @ (traj[s] - c[z]), lambda s: adj[s + 1],
                             lambda s: torch.ones(dim, dtype=torch.float64))
    thT2, _ = run(new)
    first_order = float((thT - cstar) @ (thT2 - thT))
    assert pred == pytest.approx(first_order, rel=1e-10)
    measured = probe(thT2) - probe(thT)
    assert abs(measured - pred) <= 0.5 * float((thT2 - thT) @ (thT2 - thT)) + 1e-15
    assert abs(measured - pred) < 0.05 * abs(measured)


def test_retrains_in_place_reproduce_the_run_and_record_the_mask(run, tmp_path):
    cfg = attribute.AttributeConfig(out_dir=str(run.out_dir), probe="val", d=16, n_val=2)
    ctx, _ = attribute.context(cfg)
    ids = np.load(run.out_dir / "batch_ids.npy")
    outs = attribute.retrain_all(cfg, ctx.traj, "test", [("empty", np.zeros(0, np.int64), None),
                                                        ("one", ids[3, 1:2], None)])
    last = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run.out_dir))["model"]
    again = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(outs[0]))
    assert all(torch.equal(last[k], again["model"][k]) for k in last)  # replayed order, other checkpoints: bitwise
    assert [it for it, _ in checkpoint.list_checkpoints(outs[0])] == [0, 6]
    assert checkpoint.stream_records(outs[1])["masked_rows"].tolist() == [[3, 1]]
    assert np.array_equal(np.load(outs[1] / "batch_ids.npy"), ids)
    mtime = checkpoint.latest_checkpoint(outs[1]).stat().st_mtime
    attribute.retrain_all(cfg, ctx.traj, "test", [("one", ids[3, 1:2], None)])  # finished: not run again
    assert checkpoint.latest_checkpoint(outs[1]).stat().st_mtime == mtime
    with pytest.raises(UserError, match="holds another array"):  # a stale cache is named, never reused
        attribute.save_npy(outs[1].parent / "one_mask.npy", ids[3, 2:3])


def test_cache_gives_identical_results_and_outputs_are_written(run, capsys):
    cfg = ["--out_dir=" + str(run.out_dir), "--probe=text:Once upon a time there was a cat", "--d=256"]
    a = attribute.main(cfg)
    b = attribute.main(cfg)  # from the per-checkpoint cache
    pd.testing.assert_frame_equal(a, b)
    name = attribute.probe_name("text:Once upon a time there was a cat")
    table = pd.read_csv(run.out_dir / "tables" / f"influence_{name}.csv")
    assert len(table) == len(a) and {"influence", "n_trained", "n_tagged", "fk_grade", "ref_nll"} <= set(table.columns)
    assert (run.out_dir / "visualize" / f"influence_{name}.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "most helpful" in out and "Spearman correlation" in out


@pytest.mark.parametrize("args, msg", [
    (["--probe=nonsense"], "use val, text:<text>, tag:<id> or metric:<name>"),
    (["--probe=tag:secret"], "was trained without tags"),
    (["--probe=metric:sentiment"], "run python eval.py"),
    (["--estimator=nope"], "unknown attribution estimator 'nope'; choose one of tracin, tracin_adam"),
    (["--validate=maybe"], "choose topk, lds, order or smoothness"),
    (["--steps=5:2"], "give a:b, the steps a..b-1"),
    (["--steps=2-5"], "give a:b, the steps a..b-1"),
    (["--estimator=tracin_adam"], "retrain with python train.py --keep_optimizer=True"),
])
def test_bad_input_is_one_line(run, args, msg):
    with pytest.raises(UserError, match=msg):
        attribute.main([f"--out_dir={run.out_dir}", "--d=16", *args])


@pytest.mark.slow
def test_validations_retrain_in_place_end_to_end(one_layer):
    r, masked = one_layer
    base = [f"--out_dir={r.out_dir}", "--probe=val", "--n_val=4", "--d=8"]
    res = attribute.main(base + ["--validate=lds", "--subsets=4", "--estimators=grad_dot,tracin,tracin_adam,trak"])
    assert list(res["estimator"]) == ["grad_dot", "tracin", "tracin_adam", "trak"]
    assert res["lds"].between(-1, 1).all() and (res["lo"] <= res["hi"]).all()
    root = r.out_dir / "attribution" / "retrains" / "lds_a0.5_s0"
    for m in range(4):
        rm = np.load(root / f"sub{m:03d}_mask.npy")
        kept = attribute.lds_subsets(A.Trajectory(r.out_dir).batches, 4, 0.5, 0)[m]
        assert set(rm) == set(A.Trajectory(r.out_dir).batches[~kept])
        rec = checkpoint.stream_records(root / f"sub{m:03d}")
        ids = rec["batch_ids"]
        assert np.array_equal(ids, np.load(r.out_dir / "batch_ids.npy"))  # every batch at its step
        want = sorted([int(s), int(w)] for s, w in zip(*np.nonzero(np.isin(ids, rm))))
        assert sorted(rec["masked_rows"].tolist()) == want
    df = attribute.main(base + ["--validate=topk", "--k=2", "--n_random=2"])
    top = np.load(r.out_dir / "attribution" / "retrains" / "topk_val_k2_s0" / "top_mask.npy")
    assert np.array_equal(top, df["batch_id"].to_numpy()[:2])
    ids = np.load(r.out_dir / "batch_ids.npy")
    step_of = {int(b): s for s in range(len(ids) - 1, -1, -1) for b in ids[s]}
    for k in range(2):  # the controls: other batches trained at the same steps as the top ones
        rnd = np.load(r.out_dir / "attribution" / "retrains" / "topk_val_k2_s0" / f"random{k}_mask.npy")
        assert [step_of[int(b)] for b in rnd] == [step_of[int(b)] for b in top] and not set(rnd) & set(top)
    val = pd.read_csv(r.out_dir / "tables" / "influence_val_validation.csv").iloc[0]
    assert val["k"] == 2 and val["n_random"] == 2 and np.isfinite(val["top_effect"])


def test_a_continued_run_is_retrained_from_its_start(tiny_run, tmp_path):
    """train.py --init_from=<ckpt>: the retrains start from the same weights (and refuse
    when that file changed), not from scratch."""
    import attribute
    from prebias import attribution
    src = tmp_path / "start.pt"
    shutil.copy(tiny_run.out_dir / "ckpt" / "ckpt_24.pt", src)
    run = TinyRun(tiny_run.data_dir, tiny_run.tables_dir, tmp_path / "cont")
    train.main(run.train_args(init_from=src, max_iters=4, eval_interval=2))
    traj = attribution.Trajectory(run.out_dir)
    job = attribute.retrain_job(traj, tmp_path / "retrains" / "base")
    assert f"--init_from={src.resolve()}" in job.stages[0][1]
    src.write_bytes(src.read_bytes() + b"x")
    with pytest.raises(UserError, match="which is gone or changed since"):
        attribute.retrain_job(traj, tmp_path / "retrains" / "other")


# -----------------------------------------------------------------------------
# count flags, refused before anything is computed or written

@pytest.mark.parametrize("flag", ["--n_val=0", "--n_val=-3", "--k=-1", "--k=0", "--n_random=0", "--subsets=1",
                                  "--moves=0", "--move_rows=0", "--move_frac=0", "--move_frac=0.7", "--top=-1",
                                  "--jobs=0", "--chunk=-1", "--n_boot=0", "--damping=-1",
                                  "--ekfac_damping=-0.5"])
def test_attribute_count_flags_are_refused_up_front(tiny_run, tmp_path, flag):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.out_dir, run)
    topk = ["--validate=topk"] if flag.startswith(("--k=", "--n_random=")) else []
    refused(lambda: attribute.main([f"--out_dir={run}", "--probe=val", "--d=64", *topk, flag]),
            flag.split("=")[0] + "=")
    assert not (run / "attribution").exists() and not (run / "tables").exists()


def test_occurrence_subsets_drop_exactly_k_occurrences_and_weigh_them_0():
    kept = attribute.drop_subsets(500, 6, 0.01, seed=3)
    assert kept.shape == (6, 500) and ((~kept).sum(1) == 5).all()  # exactly round(1% of 500) each
    assert np.array_equal(attribute.drop_subsets(500, 3, 0.01, seed=3), kept[:3])  # more subsets: the same first
    assert len({tuple(np.flatnonzero(~k)) for k in kept}) == 6
    assert ((~attribute.drop_subsets(30, 4, 0.01, seed=0)).sum(1) == 1).all()  # at least one
    traj = types.SimpleNamespace(rec={"batch_ids": np.zeros((5, 3), np.int64)}, run=types.SimpleNamespace(max_iters=4),
                                 occurrences=np.array([[0, 0], [0, 2], [1, 1], [3, 0], [3, 2]]))
    w = attribute.occurrence_weights(traj, np.array([True, False, True, True, False]))
    want = np.ones((4, 3))
    want[0, 2] = want[3, 2] = 0
    assert np.array_equal(w, want)


def test_occurrence_scores_sum_to_the_batch_scores(one_layer):
    """tracin scores each (step, row) by lr_s <g_probe, g_z>; an estimator that scores
    batches has its score split evenly over the batch's occurrences; a masked row is none."""
    r, masked = one_layer
    ctx, _ = attribute.context(attribute.AttributeConfig(out_dir=str(r.out_dir), probe="val", d=0, n_val=2))
    traj = ctx.traj
    ids = np.load(r.out_dir / "batch_ids.npy")
    assert len(traj.occurrences) == ids.size - 1 and [4, 1] not in traj.occurrences.tolist()
    assert np.array_equal(ids[tuple(traj.occurrences.T)], traj.batches[traj.occ_batch])
    occ, _ = A.run_estimator("tracin", ctx, "occurrence")
    np.testing.assert_allclose(traj.occurrence_sum(occ), A.run_estimator("tracin", ctx)[0], rtol=1e-12)
    (s, row), it0 = traj.occurrences[3], traj.interval_of(int(traj.occurrences[3][0])).p0
    model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(it0))
    g = by_hand_grads(model, traj.data, [ids[s, row]])[0]
    q = by_hand_grads(model, traj.data, traj.data.val_ids[:2])
    np.testing.assert_allclose(occ[3], get_lr(int(s), traj.run) * (q @ g).numpy(), rtol=1e-6)
    S, _ = A.run_estimator("grad_dot", ctx)
    spread, _ = A.run_estimator("grad_dot", ctx, "occurrence")
    np.testing.assert_allclose(traj.occurrence_sum(spread), S, rtol=1e-12)
    for b in range(len(traj.batches)):
        mine = spread[traj.occ_batch == b]
        assert np.allclose(mine, S[b] / len(mine))


@pytest.mark.slow
def test_lds_with_occurrence_drops_retrains_with_those_weights(one_layer):
    r, _ = one_layer
    base = [f"--out_dir={r.out_dir}", "--probe=val", "--n_val=4", "--d=8"]
    res = attribute.main(base + ["--validate=lds", "--subsets=4", "--drop=0.1", "--estimators=grad_dot,tracin"])
    assert list(res["estimator"]) == ["grad_dot", "tracin"] and (res["level"] == "occurrence").all()
    assert res["lds"].between(-1, 1).all() and (res["drop"] == 0.1).all()
    traj = A.Trajectory(r.out_dir)
    kept = attribute.drop_subsets(len(traj.occurrences), 4, 0.1, 0)
    root = r.out_dir / "attribution" / "retrains" / "lds_d0.1_s0"
    for m in range(4):
        dropped = traj.occurrences[~kept[m]].tolist()
        assert len(dropped) == 1  # round(0.1 x 11)
        w = np.load(root / f"sub{m:03d}_weights.npy")
        assert np.argwhere(w != 1).tolist() == dropped and (w[w != 1] == 0).all()
        rec = checkpoint.stream_records(root / f"sub{m:03d}")
        assert rec["weighted_rows"].tolist() == [[*dropped[0], 0.0]]
        assert np.array_equal(rec["batch_ids"], np.load(r.out_dir / "batch_ids.npy"))
    table = pd.read_csv(r.out_dir / "tables" / "lds_val_drop0.1.csv")
    assert list(table["estimator"]) == ["grad_dot", "tracin"] and (table["subsets"] == 4).all()


@pytest.mark.slow
def test_smoothness_retrains_along_directions_and_compares_with_the_metagradient(one_layer, tmp_path):
    r, _ = one_layer
    traj = A.Trajectory(r.out_dir)
    g = np.random.default_rng(0).normal(size=(2, 6, 2)) * 1e-3  # a stand-in d probe / d w, 2 probes
    np.save(tmp_path / "g.npy", g)
    base = [f"--out_dir={r.out_dir}", "--probe=val", "--n_val=4", "--validate=smoothness", "--directions=1",
            "--eps=0.5,1"]
    with pytest.raises(UserError, match="not finite d probe / d w of shape"):
        np.save(tmp_path / "bad.npy", g[:, :4])
        attribute.main(base + [f"--metagradient={tmp_path / 'bad.npy'}"])
    table = attribute.main(base + [f"--metagradient={tmp_path / 'g.npy'}"])
    d = SM.directions(traj.occurrences, (6, 2), 1, 0)[0]
    assert d[4, 1] == 0 and (np.abs(np.delete(d.ravel(), 9)) == 1).all()  # the masked row has no weight to move
    root = r.out_dir / "attribution" / "retrains" / "smooth_s0"
    items, _ = attribute.probe_items(attribute.AttributeConfig(n_val=4), traj)
    loss0 = attribute.measure(r.out_dir / "attribution" / "retrains" / "base" / "empty", items).mean()
    for e, row in zip((0.5, 1.0), table.itertuples()):
        for sign, col in ((1, "measured_plus"), (-1, "measured_minus")):
            out = root / f"d0_{'p' if sign > 0 else 'm'}{e:g}"
            assert np.array_equal(np.load(f"{out}_weights.npy"), 1 + sign * e * d)
            assert checkpoint.stream_records(out)["weighted_rows"].shape == (11, 3)
            assert getattr(row, col) == pytest.approx(attribute.measure(out, items).mean() - loss0, abs=1e-12)
        assert row.predicted == pytest.approx(e * float((g.mean(0) * d).sum()), rel=1e-12)
        assert row.source == "metagradient" and row.eps == e
    assert table["measured_plus"].iloc[1] != table["measured_plus"].iloc[0]
    assert (r.out_dir / "visualize" / "smoothness_val.png").stat().st_size > 10_000
    fd = attribute.main(base)  # cached retrains; the central difference at eps 0.5
    row = fd.iloc[0]
    assert row.predicted == pytest.approx((row.measured_plus - row.measured_minus) / 2, rel=1e-12)
    win = attribute.main(base[:-1] + ["--eps=1", "--steps=2:4"])  # steps 2 and 3 only: their own retrains
    w = np.load(r.out_dir / "attribution" / "retrains" / "smooth_s0_steps2-4" / "d0_p1_weights.npy")
    assert np.argwhere(w != 1).tolist() == [[2, 0], [2, 1], [3, 0], [3, 1]] and len(win) == 1
    assert pd.read_csv(r.out_dir / "tables" / "smoothness_val_steps2-4.csv")["measured_plus"].iloc[0] == \
        win["measured_plus"].iloc[0]


def test_probe_file_names_are_distinct_for_distinct_probes():
    """"text:a b" and "text:a!b" wrote the same tables (seen failing: both text_a_b)."""
    probes = ["text:a b", "text:a!b", "text:a_b", "text:a_b_", "text:" + "x" * 70, "text:" + "x" * 71, "val",
              "tag:secret", "metric:sentiment", "tag:secret_2"]
    names = [attribute.probe_name(p) for p in probes]
    assert len(set(names)) == len(names), names
    assert names[-4:] == ["val", "tag_secret", "metric_sentiment", "tag_secret_2"]  # plain ids stay readable
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in names)

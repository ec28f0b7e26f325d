"""attribute.py: the projection preserves gradient dot products, the influence sums over
the recorded intervals (a batch trained twice counts twice), the cache gives identical
results, bad probes are one line, and the validation by retraining runs end to end."""

import shutil
import types

import numpy as np
import pandas as pd
import pytest
import torch

import attribute
import train
from conftest import TinyRun
from model import ModelArgs, Transformer
from prebias import checkpoint
from prebias.common import UserError
from prebias.data import BatchData
from prebias.schedule import get_lr


def test_projection_preserves_dot_products():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=16))
    x = torch.randint(0, 64, (6, 9))
    G = attribute.batch_grads(m, x.numpy())
    exact = (G @ G.T).double()
    proj = attribute.Projector([p.numel() for p in m.parameters()], 8192, "gaussian", seed=1)
    P = proj(G)
    approx = P @ P.T
    assert np.corrcoef(exact.flatten(), approx.flatten())[0, 1] > 0.99
    np.testing.assert_allclose(np.diag(approx), np.diag(exact), rtol=0.1)
    assert torch.equal(P, proj(G))  # seeded: the same projection every call
    rad = attribute.Projector([p.numel() for p in m.parameters()], 8192, "rademacher", seed=1)(G)
    np.testing.assert_allclose(np.diag(rad @ rad.T), np.diag(exact), rtol=0.1)


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("attr") / "out"
    r = TinyRun(*tiny_data, out)
    train.main(r.train_args(max_iters=6, eval_interval=4, batch_size=2, gradient_accumulation_steps=1))
    return r


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
        gp = attribute.flat_grad(model, v[:, :-1], v[:, 1:]).double()
        for s, row in zip(range(it0, it1), checkpoint.load_checkpoint(p1)["batch_ids"].numpy()):
            for bid in row:
                w = torch.from_numpy(data.windows([bid]))
                g = attribute.flat_grad(model, w[:, :-1], w[:, 1:]).double()
                want[int(bid)] = want.get(int(bid), 0.0) + get_lr(s, cfg) * float(g @ gp)
    got = dict(zip(df["batch_id"], df["influence"]))
    assert set(got) == set(want)
    for bid in want:
        assert got[bid] == pytest.approx(want[bid], rel=1e-6, abs=1e-12)
    twice = int(ids[0, 0])
    assert int(df.loc[df["batch_id"] == twice, "n_trained"].iloc[0]) == 2


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


@pytest.mark.parametrize("probe, msg", [
    ("nonsense", "use val, text:<text>, tag:<id> or metric:<name>"),
    ("tag:secret", "was trained without tags"),
    ("metric:sentiment", "run python eval.py"),
])
def test_bad_probes_are_one_line(run, probe, msg):
    with pytest.raises(UserError, match=msg):
        attribute.main([f"--out_dir={run.out_dir}", f"--probe={probe}", "--d=16"])


@pytest.mark.slow
def test_validation_retrains_without_the_top_and_random_batches(run):
    df = attribute.main([f"--out_dir={run.out_dir}", "--probe=val", "--d=64", "--validate=True", "--k=4",
                         "--n_random=1"])
    res = pd.read_csv(run.out_dir / "tables" / "influence_val_validation.csv")
    assert res["k"].iloc[0] == 4 and np.isfinite(res["ratio"].iloc[0])
    top = np.load(run.out_dir / "attribution" / "validate" / "val" / "top.npy")
    assert np.array_equal(top, df["batch_id"].to_numpy()[:4])
    trained = np.load(run.out_dir / "attribution" / "validate" / "val" / "top" / "batch_ids.npy")
    assert not set(trained.ravel()) & set(top.tolist()) and trained.shape == (6, 2)

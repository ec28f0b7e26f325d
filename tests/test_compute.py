"""The compute record (Kaddour et al. 2023): every checkpoint holds the run's FLOPs of
training, selection's scoring and the irreducible-loss model, and its seconds, exactly as
counted by hand, the same after a resume; a checkpoint from before the record (and before
the holdout) still resumes; and the readers (reach, matched_steps) give hand-derived values."""

import hashlib

import numpy as np
import pytest
import torch

import train
from conftest import TinyRun
from model import ModelArgs, Transformer
from prebias import checkpoint, stream
from prebias.compute import ComputeRecord, compute_curve, matched_steps, reach
from prebias.data import BatchData

TINY = dict(max_iters=4, eval_interval=2)


def fpt(run_dir) -> float:
    """Forward + backward FLOPs per token of the run's model (PaLM's count)."""
    ck = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run_dir))
    return Transformer(ModelArgs.from_dict(ck["model_args"])).flops_per_token()


def test_reach_and_matched_steps_by_hand():
    assert reach([0, 10, 20], [5.0, 4.0, 3.0], 3.5) == 15.0  # halfway from 4.0 to 3.0
    assert reach([0, 10, 20], [5.0, 4.0, 3.0], 5.5) == 0.0
    assert reach([0, 10, 20], [5.0, 4.0, 3.0], 2.0) == np.inf
    assert reach([0, 100, 300], [6.0, 4.0, 2.0], 2.5) == 250.0
    assert matched_steps(2.335e12, 1e10) == 234 and matched_steps(1.0, 1e10) == 1
    rec = ComputeRecord(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64,
                                              max_seq_len=16)), ref_fit_flops=5.0, ref_fit_s=2.0)
    rec.step(8, 32, 0, 0.5, 1.0)
    d = rec.as_dict()
    f = rec.win  # one window's forward + backward
    assert d["train_flops"] == 8 * f and d["select_flops"] == pytest.approx(32 * f / 3)
    assert d["total_flops"] == pytest.approx(8 * f + 32 * f / 3 + 5.0) and d["wall_s"] == 3.5


def test_checkpoints_record_the_flops_counted_by_hand(tiny_data, tmp_path):
    data, tables = tiny_data
    rho = TinyRun(data, tables, tmp_path / "rho")
    train.main(rho.train_args(**TINY, select="rho", select_pool=2))
    f = fpt(rho.out_dir) * 64  # per window of T = 64 tokens
    c = compute_curve(rho.out_dir)
    assert c["step"].tolist() == [0, 1, 2, 4]
    # a step trains B = 8 windows (3 forward passes' worth each) and scores its pool of 16 (one forward each)
    np.testing.assert_allclose(c["flops"], c["step"] * (8 * f + 16 * f / 3), rtol=1e-12)
    ck = checkpoint.load_checkpoint(checkpoint.ckpt_path(rho.out_dir, 4))["compute"]
    assert ck["train_flops"] == 4 * 8 * f and ck["ref_score_flops"] == 0 and ck["ref_fit_flops"] == 0
    assert ck["train_s"] > 0 and ck["select_s"] > 0 and ck["counted_from_step"] == 0
    # a pool scored by a score that reads no model costs no FLOPs
    uni = TinyRun(data, tables, tmp_path / "uni")
    train.main(uni.train_args(**TINY, select="uniform", select_pool=2))
    assert compute_curve(uni.out_dir)["flops"][-1] == 4 * 8 * f
    # cut and resumed: the same totals
    cut = TinyRun(data, tables, tmp_path / "cut")
    train.main(cut.train_args(max_iters=2, eval_interval=2, select="rho", select_pool=2))
    train.main(cut.train_args(**TINY, select="rho", select_pool=2, init_from="resume"))
    assert compute_curve(cut.out_dir)["flops"].tolist() == c["flops"].tolist()


def make_legacy(out_dir, cfg_over: dict):
    """Rewrite a run's checkpoints as the code before the holdout and the compute record
    wrote them: no holdout key in the config, no holdout/reference/compute, and the stream
    fingerprint of that code (schedule, tags, method:K)."""
    for _, p in checkpoint.list_checkpoints(out_dir):
        ck = torch.load(p, weights_only=True)
        ck["config"].pop("holdout")
        for k in ("holdout", "reference"):
            ck["schedule"].pop(k)
        ck.pop("compute")
        sched = stream.build_schedule(train.TrainConfig(**{**ck["config"], **cfg_over}),
                                      BatchData(ck["config"]["data_dir"], 512, 64))
        h = hashlib.sha256(sched.fingerprint().encode())
        h.update(b"")  # no tags
        h.update(f"{ck['config']['select']}:{ck['config']['select_pool']}".encode())
        ck["schedule"]["fingerprint"] = h.hexdigest()[:16]
        torch.save(ck, p)


def test_a_run_from_before_the_holdout_resumes_exactly(tiny_data, tmp_path):
    data, tables = tiny_data
    kw = dict(select="rho", select_pool=2)
    straight = TinyRun(data, tables, tmp_path / "straight")
    train.main(straight.train_args(**TINY, **kw, holdout="keep"))  # what the old code did: every batch
    old = TinyRun(data, tables, tmp_path / "old")
    train.main(old.train_args(max_iters=2, eval_interval=2, **kw, holdout="keep"))
    make_legacy(old.out_dir, {"holdout": "keep"})
    train.main(old.train_args(**TINY, **kw, init_from="resume"))  # no --holdout: the run's own (old) rule
    a, b = checkpoint.stream_records(straight.out_dir), checkpoint.stream_records(old.out_dir)
    assert np.array_equal(a["batch_ids"], b["batch_ids"]) and np.array_equal(a["pool_ids"], b["pool_ids"])
    ck = checkpoint.load_checkpoint(checkpoint.ckpt_path(old.out_dir, 4))
    assert ck["compute"]["counted_from_step"] == 2 and ck["config"]["holdout"] == "keep"
    f = fpt(old.out_dir) * 64
    assert ck["compute"]["train_flops"] == 2 * 8 * f  # steps 2 and 3, the ones it saw

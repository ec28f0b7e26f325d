"""train.py --train_weights: real-valued loss weights per (step, row). All-ones weights are
the plain run bitwise; a zero weight where a batch is trained once is --train_mask of that
batch bitwise; a real weight scales that row's gradient term alone (the denominator stays
B x T); the weights are in the fingerprint and the record (weighted_rows), and a resume in
the middle is bitwise the uninterrupted weighted run; a bad file is one line naming it."""

import numpy as np
import pytest
import torch

import train
from conftest import TinyRun
from model import ModelArgs, Transformer
from prebias import checkpoint
from prebias.common import UserError

SHORT = dict(max_iters=6, eval_interval=4, batch_size=2, gradient_accumulation_steps=2)  # B = 4


def ckpt_models(out_dir) -> dict:
    return {it: checkpoint.load_checkpoint(p)["model"] for it, p in checkpoint.list_checkpoints(out_dir)}


def same_model(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def original(tiny_data, tmp_path_factory):
    r = TinyRun(*tiny_data, tmp_path_factory.mktemp("weights") / "orig")
    train.main(r.train_args(**SHORT))
    return r


def weighted_run(original, tmp_path, w, name="weighted", **over) -> TinyRun:
    path = tmp_path / f"{name}.npy"
    np.save(path, np.asarray(w))
    r = TinyRun(original.data_dir, original.tables_dir, tmp_path / name)
    train.main(r.train_args(**{**SHORT, **over}, train_weights=path))
    return r


def test_all_ones_weights_are_the_plain_run_bitwise(original, tmp_path):
    r = weighted_run(original, tmp_path, np.ones((6, 4)))
    a, b = ckpt_models(original.out_dir), ckpt_models(r.out_dir)
    assert sorted(a) == sorted(b) == [0, 1, 2, 4, 6]
    assert all(same_model(a[it], b[it]) for it in a)
    assert checkpoint.stream_records(r.out_dir)["weighted_rows"].shape == (0, 3)
    assert not (r.out_dir / "weighted_rows.npy").exists()


def test_a_zero_weight_is_the_mask_of_a_batch_trained_once(original, tmp_path):
    ids = np.load(original.out_dir / "batch_ids.npy")  # (6, 4)
    b = int(ids[3, 1])
    assert (ids == b).sum() == 1
    np.save(tmp_path / "mask.npy", np.array([b], np.int64))
    masked = TinyRun(original.data_dir, original.tables_dir, tmp_path / "masked")
    train.main(masked.train_args(**SHORT, train_mask=tmp_path / "mask.npy"))
    w = np.ones((6, 4))
    w[3, 1] = 0
    r = weighted_run(original, tmp_path, w)
    m, x, o = ckpt_models(masked.out_dir), ckpt_models(r.out_dir), ckpt_models(original.out_dir)
    assert all(same_model(m[it], x[it]) for it in m)
    assert not same_model(o[6], x[6])
    assert np.array_equal(np.load(r.out_dir / "batch_ids.npy"), ids)
    # the record says which row weighed what, in the checkpoint that saw it and beside the run
    assert np.load(r.out_dir / "weighted_rows.npy").tolist() == [[3.0, 1.0, 0.0]]
    assert checkpoint.load_checkpoint(checkpoint.ckpt_path(r.out_dir, 4))["weighted_rows"].tolist() == [[3, 1, 0]]
    assert checkpoint.load_checkpoint(checkpoint.ckpt_path(r.out_dir, 6))["weighted_rows"].shape == (0, 3)


def test_a_real_weight_scales_that_rows_gradient_term_alone():
    """train.weighted_loss: sum_i w_i (row i's summed token losses) / (B x T), by hand."""
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=16))
    x = torch.randint(0, 64, (4, 9))
    w = torch.tensor([1.0, 0.25, -0.5, 2.0])

    def grad(fn):
        m.zero_grad(set_to_none=True)
        fn().backward()
        return torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    got = grad(lambda: train.weighted_loss(m(x[:, :-1])[0], x[:, 1:], w))
    by_hand = grad(lambda: sum(float(w[i]) * m(x[i:i + 1, :-1], x[i:i + 1, 1:])[1] for i in range(4)) / 4)
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-7)


def test_weights_are_recorded_fingerprinted_and_resume_exactly(original, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    w = 1 + 0.3 * rng.standard_normal((6, 4))
    w[0] = 1  # a step of ones trains on the plain path: checkpoint 1 is the plain run's
    straight = weighted_run(original, tmp_path, w, "straight")
    a, o = ckpt_models(straight.out_dir), ckpt_models(original.out_dir)
    assert same_model(a[1], o[1]) and not same_model(a[6], o[6])
    rows = np.load(straight.out_dir / "weighted_rows.npy")
    want = [[s, r, float(np.float32(w[s, r]))] for s in range(6) for r in range(4) if s != 0]
    assert rows.tolist() == want  # what was trained: the float32 weight
    # killed at step 5 (after the checkpoint of step 4), resumed with the same file: bitwise the uninterrupted run
    real_step = train.Trainer.train_step

    def dying_step(self, *args):
        if self.iter_num == 5:
            raise KeyboardInterrupt
        return real_step(self, *args)
    monkeypatch.setattr(train.Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        weighted_run(original, tmp_path, w, "cut")
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    cut = TinyRun(original.data_dir, original.tables_dir, tmp_path / "cut")
    assert [it for it, _ in checkpoint.list_checkpoints(cut.out_dir)] == [0, 1, 2, 4]
    np.save(tmp_path / "other.npy", np.where(np.arange(6)[:, None] == 5, 2.0, w))
    with pytest.raises(UserError, match="fingerprint mismatch"):  # another file: refused
        train.main(cut.train_args(**SHORT, train_weights=tmp_path / "other.npy", init_from="resume"))
    with pytest.raises(UserError, match="fingerprint mismatch"):  # nor may a resume drop the weights
        train.main(cut.train_args(**SHORT, train_weights="", init_from="resume"))
    train.main(cut.train_args(**SHORT, init_from="resume"))  # the saved config names the file
    b = ckpt_models(cut.out_dir)
    assert sorted(a) == sorted(b) and all(same_model(a[it], b[it]) for it in a)
    assert np.array_equal(np.load(cut.out_dir / "weighted_rows.npy"), rows)
    assert np.array_equal(checkpoint.stream_records(cut.out_dir)["weighted_rows"], rows)


@pytest.mark.parametrize("make, msg", [
    (lambda p: np.save(p, np.ones((6, 3))), r"shape \(6, 3\), not a real array of 6 steps x 4 rows"),
    (lambda p: np.save(p, np.ones((5, 4))), r"shape \(5, 4\), not a real array of 6 steps x 4 rows"),
    (lambda p: np.save(p, np.ones(24)), r"shape \(24,\)"),
    (lambda p: np.save(p, np.array([["a"] * 4] * 6)), "holds a <U1 array"),
    (lambda p: np.save(p, np.where(np.eye(6, 4) > 0, np.nan, 1.0)), "step 0, row 0 is nan"),
    (lambda p: np.save(p, np.full((6, 4), 1e39)), "is inf .float32."),
    (lambda p: p.write_bytes(b"not numpy"), "cannot be read as a .npy array"),
    (lambda p: None, "no such file"),
])
def test_a_bad_weights_file_is_one_line_naming_it(original, tmp_path, make, msg):
    path = tmp_path / "w.npy"
    make(path)
    r = TinyRun(original.data_dir, original.tables_dir, tmp_path / "bad")
    with pytest.raises(UserError, match=msg) as e:
        train.main(r.train_args(**SHORT, train_weights=path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not checkpoint.list_checkpoints(r.out_dir)  # nothing trained or written

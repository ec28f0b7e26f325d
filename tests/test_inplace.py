"""In-place removal (train.py --train_mask) and explicit orders (the replay strategy):
an empty mask reproduces the run bitwise; a masked batch keeps its step, its rows add
nothing to the step's gradient (the denominator stays all rows x T), the steps before it
are bitwise the original's, and the record, the fingerprint and the batch viewer say so;
a replayed order is trained exactly and recorded with its content hash."""

import json

import numpy as np
import pytest
import torch

import batch_viewer
import train
from conftest import TinyRun
from model import ModelArgs, Transformer
from prebias import checkpoint
from prebias.common import UserError

SHORT = dict(max_iters=6, eval_interval=4, batch_size=2, gradient_accumulation_steps=2)


def ckpt_models(out_dir) -> dict:
    return {it: checkpoint.load_checkpoint(p)["model"] for it, p in checkpoint.list_checkpoints(out_dir)}


def same_model(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def original(tiny_data, tmp_path_factory):
    r = TinyRun(*tiny_data, tmp_path_factory.mktemp("inplace") / "orig")
    train.main(r.train_args(**SHORT))
    return r


def masked_run(original, tmp_path, ids, name="masked", **over) -> TinyRun:
    path = tmp_path / f"{name}.npy"
    np.save(path, np.asarray(ids, np.int64))
    r = TinyRun(original.data_dir, original.tables_dir, tmp_path / name)
    train.main(r.train_args(**{**SHORT, **over}, train_mask=path))
    return r


def test_an_empty_mask_reproduces_the_run_bitwise(original, tmp_path):
    r = masked_run(original, tmp_path, [])
    a, b = ckpt_models(original.out_dir), ckpt_models(r.out_dir)
    assert sorted(a) == sorted(b) == [0, 1, 2, 4, 6]
    assert all(same_model(a[it], b[it]) for it in a)
    assert np.array_equal(np.load(r.out_dir / "batch_ids.npy"), np.load(original.out_dir / "batch_ids.npy"))
    assert checkpoint.stream_records(r.out_dir)["masked_rows"].shape == (0, 2)
    assert not (r.out_dir / "masked_rows.npy").exists()


def test_a_masked_batch_keeps_its_step_and_only_its_step_changes(original, tmp_path, capsys):
    ids = np.load(original.out_dir / "batch_ids.npy")  # (6, 4)
    b = int(ids[3, 1])
    assert (ids == b).sum() == 1  # trained once, at step 3 row 1
    r = masked_run(original, tmp_path, [b])
    # every batch at its step, the record says which row weighed 0
    assert np.array_equal(np.load(r.out_dir / "batch_ids.npy"), ids)
    rec = checkpoint.stream_records(r.out_dir)
    assert rec["masked_rows"].tolist() == [[3, 1]]
    assert np.load(r.out_dir / "masked_rows.npy").tolist() == [[3, 1]]
    assert checkpoint.load_checkpoint(checkpoint.ckpt_path(r.out_dir, 4))["masked_rows"].tolist() == [[3, 1]]
    # the steps before it are bitwise the original's; from step 3 on the model differs
    a, m = ckpt_models(original.out_dir), ckpt_models(r.out_dir)
    assert all(same_model(a[it], m[it]) for it in (0, 1, 2))
    assert not same_model(a[4], m[4])
    # the learning-rate schedule and the step count are unchanged
    assert [json.loads(x)["changed"] for x in (r.out_dir / "history.jsonl").read_text().splitlines()] == [{}]
    assert checkpoint.list_checkpoints(r.out_dir)[-1][0] == 6
    # the batch viewer shows it
    rows = batch_viewer.main([f"--out_dir={r.out_dir}", "--step=3"])
    assert rows.tolist() == ids[3].tolist()
    out = capsys.readouterr().out
    assert out.count("loss weight 0") == 1 and f"batch_id:{b} " in out.split("    loss weight 0")[0].splitlines()[-1]


def test_the_mask_is_part_of_the_fingerprint(original, tmp_path):
    ids = np.load(original.out_dir / "batch_ids.npy")
    r = masked_run(original, tmp_path, [ids[3, 1]], max_iters=4)
    fp = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(r.out_dir))["schedule"]["fingerprint"]
    assert fp != checkpoint.load_checkpoint(checkpoint.ckpt_path(original.out_dir, 4))["schedule"]["fingerprint"]
    np.save(tmp_path / "other.npy", np.asarray([ids[2, 0]], np.int64))
    with pytest.raises(UserError, match="fingerprint mismatch"):
        train.main(r.train_args(**{**SHORT, "max_iters": 6}, train_mask=tmp_path / "other.npy",
                                init_from="resume"))
    with pytest.raises(UserError, match="fingerprint mismatch"):  # nor may a resume drop the mask
        train.main(r.train_args(**{**SHORT, "max_iters": 6}, train_mask="", init_from="resume"))
    train.main(r.train_args(**{**SHORT, "max_iters": 6}, init_from="resume"))  # a resume keeps the saved mask
    assert checkpoint.stream_records(r.out_dir)["masked_rows"].tolist() == [[3, 1]]


def test_masked_rows_add_nothing_to_the_gradient():
    """train.weighted_loss with 0/1 weights: its gradient is the kept rows' summed token
    losses over all B x T tokens, and what a masked row holds does not matter (bitwise)."""
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=16))
    w = torch.randint(0, 64, (4, 9))
    keep = torch.tensor([True, False, True, True])

    def grad(loss_fn, windows):
        m.zero_grad(set_to_none=True)
        loss_fn(windows).backward()
        return torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    masked = grad(lambda x: train.weighted_loss(m(x[:, :-1])[0], x[:, 1:], keep), w)
    w2 = w.clone()
    w2[1] = torch.randint(0, 64, (9,))  # other tokens in the masked row
    assert torch.equal(masked, grad(lambda x: train.weighted_loss(m(x[:, :-1])[0], x[:, 1:], keep), w2))
    # by hand: each kept row's mean loss, summed, over the 4 rows (the denominator of no mask)
    by_hand = grad(lambda x: sum(m(x[i:i + 1, :-1], x[i:i + 1, 1:])[1] for i in (0, 2, 3)) / 4, w)
    torch.testing.assert_close(masked, by_hand, rtol=1e-5, atol=1e-7)
    full = grad(lambda x: m(x[:, :-1], x[:, 1:])[1], w)
    assert not torch.allclose(masked, full)


def test_a_replayed_order_is_trained_exactly_and_recorded(original, tmp_path):
    ids = np.load(original.out_dir / "batch_ids.npy")
    order = ids.copy()
    order[[1, 4]] = order[[4, 1]]  # steps 1 and 4 swap their batches
    np.save(tmp_path / "order.npy", order)
    spec = tmp_path / "order.json"
    spec.write_text(json.dumps({"phases": [{"strategy": "replay", "ids": str(tmp_path / "order.npy")}]}))
    r = TinyRun(original.data_dir, original.tables_dir, tmp_path / "replayed")
    train.main(r.train_args(**SHORT, schedule_spec=spec))
    assert np.array_equal(np.load(r.out_dir / "batch_ids.npy"), order)
    ck = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(r.out_dir))
    import hashlib
    assert ck["schedule"]["spec"]["phases"][0]["ids_sha256"] == hashlib.sha256(order.tobytes()).hexdigest()[:16]
    # the original order replayed is the original run, bitwise
    np.save(tmp_path / "same.npy", ids)
    spec.write_text(json.dumps({"phases": [{"strategy": "replay", "ids": str(tmp_path / "same.npy")}]}))
    same = TinyRun(original.data_dir, original.tables_dir, tmp_path / "same")
    train.main(same.train_args(**SHORT, schedule_spec=spec))
    a, b = ckpt_models(original.out_dir), ckpt_models(same.out_dir)
    assert all(same_model(a[it], b[it]) for it in a)
    # a changed file under the same spec is refused on resume (the content is fingerprinted)
    np.save(tmp_path / "same.npy", order)
    with pytest.raises(UserError, match="fingerprint mismatch|changed since"):
        train.main(same.train_args(**SHORT, schedule_spec=spec, init_from="resume"))
    np.save(tmp_path / "short.npy", ids[:3])
    spec.write_text(json.dumps({"phases": [{"strategy": "replay", "ids": str(tmp_path / "short.npy")}]}))
    with pytest.raises(UserError, match="has 3 steps; the phase lasts 6"):
        train.main(TinyRun(original.data_dir, original.tables_dir, tmp_path / "x").train_args(**SHORT,
                                                                                             schedule_spec=spec))

"""tags.py (the tag file and its validation) and tags in a real training run: the trained
tokens hold the tag where the checkpoint says, and resume and 2 DDP ranks give the same
insertions."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import train
from conftest import ROOT, TinyRun, refused
from prebias import checkpoint, stream, tags
from prebias.common import UserError
from prebias.data import BOS_ID, BatchData
from tokenizer import Tokenizer

CANARY = {"id": "secret", "kind": "canary", "text": "the secret number is {digits:6}",
          "steps": {"start": 2, "n": 3, "every": 2}, "rows": 2, "position": "random"}
HAPPY = {"id": "happy", "kind": "conditional", "text": "<happy>", "metric": "sentiment", "lo": 0.3, "hi": None,
         "steps": {"start": 0, "end": 4}}


@pytest.fixture(scope="module")
def enc(tiny_data):
    return Tokenizer.for_vocab(512, tiny_data[0])


def test_canary_renders_a_seeded_secret_and_candidates(enc):
    ts = tags.parse_tags({"seed": 5, "tags": [CANARY]}, enc, 64, 512)
    t = ts.tags[0]
    assert t.text.startswith("the secret number is ") and len(t.text) == len("the secret number is ") + 6
    assert t.tokens.tolist() == enc.encode(t.text, bos=False)
    assert np.array_equal(t.tokens, np.concatenate([t.prefix_tokens, t.secret_tokens]))
    assert t.steps(20).tolist() == [2, 4, 6] and not t.active(8) and not t.active(3)
    again = tags.parse_tags({"seed": 5, "tags": [CANARY]}, enc, 64, 512)
    assert again.tags[0].text == t.text and tags.parse_tags({"seed": 6, "tags": [CANARY]}, enc, 64, 512).tags[0].text != t.text
    c = t.candidates(200, 0)
    assert c.shape == (200, len(t.secret_tokens)) and not (c == t.secret_tokens).all(1).any()
    assert len({tuple(r) for r in c}) == 200 and np.array_equal(c, t.candidates(200, 0))
    back = tags.tags_from_json(ts.json, enc, 64, 512)  # the checkpoint alone rebuilds it
    assert back.tags[0].text == t.text and np.array_equal(back.tags[0].tokens, t.tokens)


def test_a_conditional_tag_gets_a_control_of_its_length_and_steps(enc):
    ts = tags.parse_tags({"seed": 1, "tags": [HAPPY, CANARY]}, enc, 64, 512)
    hap, can, ctl = ts.tags  # the control after the file's tags: theirs keep their indices
    assert (hap.index, can.index, ctl.index, hap.control, ctl.control_of) == (0, 1, 2, 2, 0)
    assert ctl.kind == "control" and ctl.id == "happy:control" and len(ctl.tokens) == len(hap.tokens)
    assert ctl.tokens.min() >= 3 and ctl.tokens.max() < 512 and ctl.tokens.tolist() != hap.tokens.tolist()
    assert ctl.steps(10).tolist() == hap.steps(10).tolist() == [0, 1, 2, 3] and ctl.metric == "sentiment"
    again = tags.parse_tags({"seed": 1, "tags": [HAPPY, CANARY]}, enc, 64, 512)
    assert again.tags[2].tokens.tolist() == ctl.tokens.tolist()  # seeded
    assert tags.parse_tags({"seed": 2, "tags": [HAPPY]}, enc, 64, 512).tags[1].tokens.tolist() != ctl.tokens.tolist()
    back = tags.tags_from_json(ts.json, enc, 64, 512)  # the checkpoint keeps the control's ids
    assert back.tags[2].tokens.tolist() == ctl.tokens.tolist() and back.json == ts.json
    off = tags.parse_tags({"seed": 1, "tags": [{**HAPPY, "control": False}]}, enc, 64, 512)
    assert len(off.tags) == 1 and off.tags[0].control is None
    old = json.loads(ts.json)  # a run recorded before controls existed: none is made up for it
    del old["tags"][0]["control"]
    assert [t.kind for t in tags.tags_from_json(json.dumps(old), enc, 64, 512).tags] == ["conditional", "canary"]
    with pytest.raises(UserError, match=r"tags\[1\].id: 'happy:control': letters, digits"):  # ':' is the controls'
        tags.parse_tags({"seed": 1, "tags": [HAPPY, {**CANARY, "id": "happy:control"}]}, enc, 64, 512)
    with pytest.raises(UserError, match=r"tags\[0\].control: must be true"):
        tags.parse_tags({"seed": 1, "tags": [{**HAPPY, "control": "yes"}]}, enc, 64, 512)


def test_the_control_goes_after_the_bos_of_random_stories_at_the_tags_rate(tiny_data):
    """Over the training shards the control's stories are as many as the tag's (its rate)
    but drawn without regard to the metric: as common among the tag's stories as among
    the others. Inserted, it sits right after a data BOS, or after the tag where both are."""
    data_dir = tiny_data[0]
    data = BatchData(data_dir, 512, 64)
    ts = tags.parse_tags({"seed": 1, "tags": [{**HAPPY, "lo": 0.6}]}, Tokenizer.for_vocab(512, data_dir), 64, 512)
    ins = stream.Inserter(ts, data, data_dir, seed=3)
    hap, ctl = ts.tags
    shards = range(1, len(data.meta["shards"]))
    tag_in = np.concatenate([ins._stories(hap, s) for s in shards])
    ctl_in = np.concatenate([ins._stories(ctl, s) for s in shards])
    n, p = len(tag_in), tag_in.mean()
    assert 0.1 < p < 0.9 and abs(ctl_in.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    a, b = ctl_in[tag_in].mean(), ctl_in[~tag_in].mean()  # independent of the condition
    assert abs(a - b) < 4 * math.sqrt(p * (1 - p) * (1 / tag_in.sum() + 1 / (~tag_in).sum()))
    ids = data.train_ids[:64]
    wins = data.windows(ids)
    rows, _, _ = ins.apply(0, ids, wins)
    mine = rows[rows[:, 3] == ctl.index]
    assert len(mine) > 0
    assert all(mode == stream.INSERT and k == len(ctl.tokens) for _, _, _, _, k, mode in mine)

    def at(w, toks):  # where toks start in window w
        return [i for i in range(len(w) - len(toks) + 1) if w[i:i + len(toks)].tolist() == toks.tolist()]
    n_tag = n_ctl = 0
    for w in wins:  # as trained: the tag right after a BOS, the control after the BOS or the tag
        for i in at(w, hap.tokens):
            assert w[i - 1] == BOS_ID
            n_tag += 1
        for i in at(w, ctl.tokens):
            assert w[i - 1] == BOS_ID or (i >= len(hap.tokens) and i - len(hap.tokens) in at(w, hap.tokens))
            n_ctl += 1
    assert n_ctl == len(mine) and n_tag == (rows[:, 3] == hap.index).sum()


@pytest.mark.parametrize("bad, msg", [
    ({"tags": []}, "needs a non-empty list 'tags'"),
    ({"tags": [{**CANARY, "kind": "sticker"}]}, r"tags\[0\].kind: 'sticker' is not one of canary, conditional"),
    ({"tags": [{**CANARY, "colour": 1}]}, r"tags\[0\]: unknown key 'colour'"),
    ({"tags": [{k: v for k, v in CANARY.items() if k != "text"}]}, r"tags\[0\].text: missing"),
    ({"tags": [CANARY, CANARY]}, r"tags\[1\].id: duplicate id 'secret'"),
    ({"tags": [{**CANARY, "steps": {"start": 5}}]}, r"tags\[0\].steps: give end or n"),
    ({"tags": [{**CANARY, "steps": {"start": 5, "end": 2}}]}, r"end 2 <= start 5"),
    ({"tags": [{**CANARY, "text": "word " * 40}]}, r"tokens: at most max_seq_len/2 = 32"),
    ({"tags": [{**HAPPY, "metric": "joy"}]}, r"tags\[0\].metric: 'joy' is not a text metric"),
    ({"tags": [{**HAPPY, "lo": 0.9, "hi": 0.1}]}, "lo 0.9 > hi 0.1"),
])
def test_bad_tag_files_name_the_field(enc, bad, msg):
    with pytest.raises(UserError, match=msg):
        tags.parse_tags(bad, enc, 64, 512)


def tagged_run(tiny_data, out, path, **kw):
    data, tables = tiny_data
    run = TinyRun(data, tables, out)
    train.main(run.train_args(max_iters=6, eval_interval=4, tags=path, **kw))
    return run


def test_training_with_tags_trains_the_recorded_tokens(tiny_data, tmp_path, monkeypatch, capsys):
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"seed": 1, "tags": [CANARY, HAPPY]}))
    seen = {}
    real = train.Trainer.train_step

    def spy(self, windows):
        seen[self.iter_num] = windows.copy()
        return real(self, windows)
    monkeypatch.setattr(train.Trainer, "train_step", spy)
    run = tagged_run(tiny_data, tmp_path / "out", path)
    rec = checkpoint.stream_records(run.out_dir)
    ins = rec["insertions"]
    canary_rows = ins[ins[:, 3] == 0]
    assert canary_rows[:, 0].tolist() == [2, 2, 4, 4]  # steps 2 and 4 (6 is past the run), 2 rows each
    assert (ins[ins[:, 3] == 1, 0] < 4).all() and (ins[:, 3] == 1).any()
    data = BatchData(run.data_dir, 512, 64)
    ts = tags.tags_from_json(rec["tags"], Tokenizer.for_vocab(512, run.data_dir), 64, 512)
    for step, row, pos, tag, n, mode in ins:
        assert seen[step][row, pos:pos + n].tolist() == ts.tags[tag].tokens.tolist()
    for t in range(6):  # the record rebuilds exactly what train_step got
        assert np.array_equal(stream.trained_windows(data, rec["batch_ids"][t], t, rec), seen[t])
    z = np.load(run.out_dir / "insertions.npz")
    assert np.array_equal(z["insertions"], ins)
    # the batch viewer shows the text as trained, with the canary in it
    import batch_viewer
    shown = batch_viewer.main([f"--out_dir={run.out_dir}", "--step=2", "--chars=0"])
    out = capsys.readouterr().out
    assert np.array_equal(shown, rec["batch_ids"][2])
    assert out.count("tag 0 replaced at token") == 2 and ts.tags[0].text in out


@pytest.mark.slow
def test_tags_are_exact_on_resume_and_with_two_ranks(tiny_data, tmp_path):
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"seed": 1, "tags": [CANARY, HAPPY]}))
    straight = tagged_run(tiny_data, tmp_path / "straight", path)
    data, tables = tiny_data
    cut = TinyRun(data, tables, tmp_path / "cut")
    train.main(cut.train_args(max_iters=3, eval_interval=4, tags=path))
    train.main(cut.train_args(max_iters=6, eval_interval=4, tags=path, init_from="resume"))
    a, b = checkpoint.stream_records(straight.out_dir), checkpoint.stream_records(cut.out_dir)
    for k in ("batch_ids", "insertions", "insert_tokens", "replaced_tokens"):
        assert np.array_equal(a[k], b[k]), k
    ddp = TinyRun(data, tables, tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train.py"), *ddp.train_args(max_iters=6, eval_interval=4, tags=path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    c = checkpoint.stream_records(ddp.out_dir)
    for k in ("batch_ids", "insertions", "insert_tokens"):
        assert np.array_equal(a[k], c[k]), k
    # another tag file cannot resume this run
    path.write_text(json.dumps({"seed": 2, "tags": [CANARY, HAPPY]}))
    with pytest.raises(UserError, match="tags or selection changed"):
        train.main(cut.train_args(max_iters=8, eval_interval=4, tags=path, init_from="resume"))


def test_bad_tag_file_writes_nothing(tiny_data, tmp_path):
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"tags": [{**CANARY, "position": "middle"}]}))
    run = TinyRun(*tiny_data, tmp_path / "never")
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *run.train_args(tags=path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 1 and "tags[0].position: 'middle' is not start or random" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not run.out_dir.exists()


# -----------------------------------------------------------------------------
# the tag file's error lines

def test_tag_file_lines_name_the_file_and_the_fix(tmp_path):
    enc = Tokenizer()
    p = tmp_path / "tags.json"
    p.write_text(json.dumps({"seed": 1, "tags": [{"id": "a", "kind": "canary", "text": "x {digits:65}",
                                                   "steps": {"start": 1, "n": 2}, "rows": 1}]}))
    refused(lambda: tags.load_tags(p, enc, 64, 512), str(p), "tags[0].text", "{digits:65}", "e.g.")
    p.write_text(json.dumps({"seed": 1, "tags": [{"id": "a", "kind": "canary", "text": "x {digits:3} {digits:3}",
                                                   "steps": {"start": 1, "n": 2}, "rows": 1}]}))
    refused(lambda: tags.load_tags(p, enc, 64, 512), str(p), "tags[0].text", "one placeholder")
    p.write_text('{"seed": 1, "tags": [{"id": "a", "ki')
    refused(lambda: tags.load_tags(p, enc, 64, 512), str(p), "not valid JSON", "--tags")
    p.unlink()
    p.mkdir()
    refused(lambda: tags.load_tags(p, enc, 64, 512), str(p), "folder", "--tags")

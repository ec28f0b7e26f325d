"""durability.py: exposure where the answer is known (a model that memorised the canary,
an untrained one), the forgetting fit on a known curve, and the stage end to end on a
tagged run (rows per checkpoint and tag, steps since seen, the figure, the cache)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import durability
import train
from conftest import TinyRun
from model import ModelArgs, Transformer
from prebias import tags
from prebias.common import UserError
from prebias.data import BOS_ID
from tokenizer import Tokenizer

CANARY = {"id": "secret", "kind": "canary", "text": "the secret number is {digits:6}",
          "steps": {"start": 1, "n": 2, "every": 2}, "rows": 2}
HAPPY = {"id": "happy", "kind": "conditional", "text": "<happy>", "metric": "sentiment", "lo": 0.3, "hi": None,
         "steps": {"start": 0, "end": 3}}


def test_exposure_is_maximal_when_memorised_and_small_when_untrained(tiny_data):
    enc = Tokenizer.for_vocab(512, tiny_data[0])
    tag = tags.parse_tags({"seed": 3, "tags": [CANARY]}, enc, 64, 512).tags[0]
    cands = tag.candidates(200, 0)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=64))
    untrained = durability.canary_row(model, tag, cands, durability.DurabilityConfig(batch_size=64), "cpu")
    seq = torch.tensor([[BOS_ID, *tag.tokens.tolist()]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):  # memorise the canary
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    learned = durability.canary_row(model, tag, cands, durability.DurabilityConfig(batch_size=64), "cpu")
    assert learned["exposure"] == pytest.approx(math.log2(200))  # ranked first among 200 + 1
    assert learned["extraction"] == 1.0 and learned["loss"] < 0.05
    assert untrained["exposure"] < 3.0 and untrained["extraction"] < 0.5
    assert durability.exposure(1.0, np.array([0.5, 2.0, 3.0, 4.0])) == pytest.approx(2 - 1)  # rank 2 of 4


def test_half_life_fit_recovers_a_known_decay():
    x = np.array([0, 5, 10, 20, 40, 80], float)
    y = 1.0 + (9.0 - 1.0) * 2 ** (-x / 12)
    f = durability.half_life(x, y, baseline=1.0)
    assert f["status"] == "fitted" and f["half_life"] == pytest.approx(12, rel=0.02)
    assert f["half_life_lo"] <= 12 <= f["half_life_hi"]
    flat = durability.half_life(x, np.full(6, 9.0), baseline=1.0)
    assert flat["status"] == "not forgotten within the run"


def test_durability_end_to_end(tiny_data, tmp_path, capsys):
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"seed": 1, "tags": [CANARY, HAPPY]}))
    run = TinyRun(*tiny_data, tmp_path / "out")
    train.main(run.train_args(max_iters=8, eval_interval=8, tags=path))
    args = [f"--out_dir={run.out_dir}", "--R=50", "--n_prompts=4", "--max_new_tokens=8"]
    df = durability.main(args)
    assert sorted(set(df["iter"])) == [0, 1, 2, 4, 8] and set(df["tag"]) == {"secret", "happy"}
    sec = df[df["tag"] == "secret"].set_index("iter")
    # inserted at steps 1 and 3: unseen at 0 and 1, then 0 steps since at checkpoint 2, 0 at 4, 4 at 8
    assert sec["steps_since_seen"].isna().tolist()[:2] == [True, True]
    assert sec.loc[[2, 4, 8], "steps_since_seen"].tolist() == [0.0, 0.0, 4.0]
    assert sec["exposure"].between(-1, math.log2(50)).all() and sec["extraction"].between(0, 1).all()
    hap = df[df["tag"] == "happy"]
    assert (hap["effect_lo"] <= hap["effect"]).all() and (hap["n"] <= 4).all()
    png = run.out_dir / "visualize" / "durability.png"
    assert png.stat().st_size > 10_000
    fits = pd.read_csv(run.out_dir / "tables" / "durability_fit.csv")
    assert set(fits["tag"]) == {"secret", "happy"} and set(fits["measure"]) == {"exposure", "loss", "effect"}
    assert (fits.loc[fits["tag"] == "secret", "last_step"] == 3).all()
    capsys.readouterr()
    again = durability.main(args)
    assert "measured" not in capsys.readouterr().out  # every checkpoint reused
    pd.testing.assert_frame_equal(again.reset_index(drop=True), df.reset_index(drop=True), check_dtype=False)


def test_a_run_without_tags_is_one_line(tiny_run):
    with pytest.raises(UserError, match="trained without tags: train with --tags"):
        durability.main([f"--out_dir={tiny_run.out_dir}"])

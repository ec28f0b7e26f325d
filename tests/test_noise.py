"""The noisy test bed: `tinystories.py sample --noise` corrupts exactly the planned
training stories (validation stays clean, clean stories stay byte-identical), and the
batch metrics' noisy column is each window's share of corrupted tokens."""

import json

import numpy as np
import pandas as pd
import pytest

import tinystories
from prebias import storygen
from prebias.data import BOS_ID, BatchData, story_noise


@pytest.fixture(scope="module")
def noisy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("noisy")
    clean, noisy = root / "clean", root / "noisy"
    tinystories.sample(clean, n_stories=400, n_shards=4, seed=5)
    tinystories.sample(noisy, n_stories=400, n_shards=4, seed=5, noise=0.2)
    return clean, noisy


def rows(d, i):
    return json.loads((d / "TinyStories_all_data" / f"data{i:02d}.json").read_text())


def test_noise_flags_match_what_was_corrupted(noisy_data):
    clean, noisy = noisy_data
    assert "noise" not in rows(clean, 1)[0]
    assert all(r["noise"] is None for r in rows(noisy, 0))  # validation stays clean
    kinds, changed = [], 0
    for i in range(1, 4):
        for a, b in zip(rows(clean, i), rows(noisy, i)):
            if b["noise"] is None:
                assert a["story"] == b["story"]  # byte-identical
            else:
                kinds.append(b["noise"])
                changed += a["story"] != b["story"]
    assert len(kinds) == round(0.2 * 300) == changed
    assert sorted(set(kinds)) == sorted(storygen.NOISE_KINDS)
    plan = storygen.noise_plan(300, 0.2, 5)
    flat = [r["noise"] for i in range(1, 4) for r in rows(noisy, i)]
    assert {i for i, k in enumerate(flat) if k} == set(plan)
    again = tinystories.sample(noisy.parent / "again", n_stories=400, n_shards=4, seed=5, noise=0.2)
    assert (again / "data02.json").read_bytes() == (noisy / "TinyStories_all_data" / "data02.json").read_bytes()
    pairs = [(a["story"], b["story"]) for i in range(1, 4) for a, b in zip(rows(clean, i), rows(noisy, i))
             if b["noise"] == "shuffled"]
    assert all(sorted(a.split()) == sorted(b.split()) and a != b for a, b in pairs)  # the same words, reordered


def test_noisy_column_is_the_share_of_corrupted_tokens(noisy_data, tmp_path):
    clean, noisy = noisy_data
    for d in (clean, noisy):
        tinystories.train_vocab(512, d)
        tinystories.pretokenize(512, 64, d, workers=1, tables_dir=d / "tables", metrics="n_words")
    assert (pd.read_csv(clean / "tables" / "batch_metrics.csv")["noisy"] == 0).all()
    bm = pd.read_csv(noisy / "tables" / "batch_metrics.csv")
    data = BatchData(noisy, 512, 64)
    flags = story_noise(noisy / "TinyStories_all_data" / "data01.json")
    toks = np.asarray(data.tokens[1])
    starts = np.flatnonzero(toks == BOS_ID)
    checked = 0
    for bid in np.flatnonzero(data.index["shard"] == 1)[:40]:
        off = int(data.index[bid]["offset"])
        owner = np.searchsorted(starts, np.arange(off, off + 65), side="right") - 1  # by hand, token by token
        want = np.mean([flags[s] for s in owner])
        assert bm.loc[bid, "noisy"] == pytest.approx(want, abs=1e-6)
        checked += want > 0
    assert checked > 0 and bm.loc[bm["split"] == "val", "noisy"].eq(0).all()
    assert 0.1 < bm.loc[bm["split"] == "train", "noisy"].mean() < 0.35


def test_noisy_copy_plants_the_same_noise_in_any_stories(noisy_data, tmp_path):
    """tinystories.noisy_copy (real stories as a noisy bed) corrupts exactly as sample --noise
    does: the same plan over the training stories, the same corrupted text, validation clean."""
    clean, noisy = noisy_data
    out = tinystories.noisy_copy(clean, tmp_path / "copy", 0.2, seed=5)
    for i in range(4):
        assert (out / f"data{i:02d}.json").read_text() == (noisy / "TinyStories_all_data" / f"data{i:02d}.json").read_text()
    assert not story_noise(out / "data00.json").any() and story_noise(out / "data01.json").any()

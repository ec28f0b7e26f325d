"""prebias/refscorer.py, the reference scorer of the data (ref_nll): a damaged fitted scorer
file is fitted again to the same deterministic fit, and a reference model trained with
another tokenizer is refused (a model.bin, which records none, is taken with a note)."""

import shutil

import pandas as pd
import pytest

import tinystories
from conftest import SEQ, VOCAB, copy_data, pretok
from prebias import checkpoint, refscorer
from prebias.common import UserError


def test_a_damaged_reference_scorer_is_fitted_again(tiny_data, tmp_path, capsys):
    """A truncated ref_ngram3.npz: pretokenize said 're-run pretokenize' while being that
    command (a traceback), and eval's reader named the same failing fix."""
    data_dir, tables = copy_data(tiny_data, tmp_path)
    p = refscorer.scorer_path(data_dir, VOCAB)
    if not p.exists():
        pretok(data_dir, tables, metrics="fk_grade")
    good = refscorer.NGramScorer.load(p).fingerprint()
    p.write_bytes(p.read_bytes()[:300])
    pretok(data_dir, tables, metrics="fk_grade")
    assert "not a readable scorer file" in capsys.readouterr().out
    assert refscorer.NGramScorer.load(p).fingerprint() == good  # the same deterministic fit
    p.write_bytes(b"junk")  # the reader eval uses
    assert refscorer.reference_scorer(data_dir, VOCAB).fingerprint() == good
    p.with_suffix(".json").write_text("{")  # a damaged stamp: fitted again, no traceback
    assert refscorer.fit_reference_scorer(data_dir, VOCAB).fingerprint() == good


def test_a_reference_checkpoint_of_another_tokenizer_is_refused(tiny_run, tmp_path, capsys):
    """A .pt of the same vocabulary size but another tokenizer scored the data as other text."""
    ck = checkpoint.ckpt_path(tiny_run.out_dir, 2)
    c = checkpoint.load_checkpoint(ck)
    c["data"] = {**c["data"], "tokenizer_sha256": "0" * 64}
    import torch
    other = tmp_path / "ckpt_2.pt"
    torch.save(c, other)
    d = tmp_path / "data"
    shutil.copytree(tiny_run.data_dir, d)
    with pytest.raises(UserError, match=r"--ref_model=.* was trained with another tokenizer"):
        tinystories.pretokenize(VOCAB, SEQ, d, workers=1, tables_dir=tmp_path / "t", ref_model=str(other))
    # a model.bin records no tokenizer: said, and the data scored with it (its workers start
    # fresh: forked from this process, whose OpenMP pool has run, they deadlocked)
    tinystories.pretokenize(VOCAB, SEQ, d, workers=1, tables_dir=tmp_path / "t", metrics="fk_grade",
                            ref_model=str(tiny_run.out_dir / "model.bin"))
    assert "is a model.bin, which records no tokenizer" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "t" / "batch_metrics.csv")["ref_nll"].notna().all()

"""The second audit's findings on the data stages (issue 21): each one a test seen failing
before its fix. A copy of a raw shard, a damaged reference scorer file, and a bad
--metrics/--ref_model request that used to rewrite the index before it was refused."""
import shutil

import pytest

import tinystories
from conftest import SEQ, VOCAB
from prebias import refscorer
from prebias.common import UserError
from prebias.data import index_dir, tok_dir


def copy_data(tiny_data, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data[0], data_dir)
    return data_dir, tmp_path / "tables"


def pretok(data_dir, tables, **kw):
    return tinystories.pretokenize(vocab_size=VOCAB, max_seq_len=SEQ, data_dir=data_dir, workers=1,
                                   tables_dir=tables, **kw)


@pytest.mark.parametrize("copied", ["data00.json", "data02.json"])
def test_a_copy_of_a_raw_shard_is_refused(tiny_data, tmp_path, copied):
    """A byte copy of the validation shard was tokenised as a new training shard (and a copy
    of a training shard trained twice): the symlink was refused, the copy was not."""
    data_dir, tables = copy_data(tiny_data, tmp_path)
    raw = data_dir / "TinyStories_all_data"
    n = len(sorted(raw.glob("data*.json")))
    shutil.copy(raw / copied, raw / f"data{n:02d}.json")
    meta = (index_dir(data_dir, VOCAB, SEQ) / "meta.json").read_bytes()
    with pytest.raises(UserError, match=rf"raw shards .*{copied} and .*data{n:02d}.json hold the same bytes.*remove"):
        pretok(data_dir, tables, metrics="none")
    assert (index_dir(data_dir, VOCAB, SEQ) / "meta.json").read_bytes() == meta  # nothing rewritten
    assert not (tok_dir(data_dir, VOCAB) / f"data{n:02d}.bin").exists()


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


@pytest.mark.parametrize("kw, words", [({"metrics": "fk_grade,nope"}, "nope"),
                                       ({"metrics": "fk_grade", "ref_model": "MISSING"}, "MISSING")])
def test_a_bad_metrics_request_is_refused_before_the_index_is_rewritten(tiny_data, tmp_path, kw, words):
    data_dir, tables = copy_data(tiny_data, tmp_path)
    meta = index_dir(data_dir, VOCAB, SEQ) / "meta.json"
    before = meta.stat().st_mtime_ns
    if kw.get("ref_model") == "MISSING":
        kw["ref_model"] = str(tmp_path / "MISSING.bin")
    with pytest.raises(UserError, match=words):
        pretok(data_dir, tables, **kw)
    assert meta.stat().st_mtime_ns == before

"""Data stages: download (against a local HTTP server), sample, train_vocab,
pretokenize (.bin shards and batch index, checked exactly), the batch reader."""

import http.server
import io
import json
import re
import shutil
import socket
import struct
import tarfile
import threading

import numpy as np
import pytest

import tinystories
from conftest import SEQ, VOCAB, copy_data, pretok
from prebias import data
from prebias.common import UserError
from prebias.data import (BatchData, index_dir, load_stories, shard_window_texts, shard_windows, shard_windows_2d,
                          tok_dir, window_texts)
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# a local HTTP server with Range support, which can cut a response short

class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    cut_after = None  # bytes to send before dropping the connection (once)
    ranges_seen = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        data, start = type(self).payload, 0
        rng = self.headers.get("Range")
        type(self).ranges_seen.append(rng)
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = type(self).cut_after
        if cut is not None:
            type(self).cut_after = None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    handler = type("H", (_Handler,), {"ranges_seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/TinyStories_all_data.tar.gz"
    httpd.shutdown()


def make_archive(files: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SHARDS = {f"data{i:02d}.json": json.dumps([{"story": f"Story {i} number {j}."} for j in range(50)]).encode()
          for i in range(3)}


def test_download_full_and_skip(server, tmp_path):
    handler, url = server
    handler.payload = make_archive(SHARDS)
    tinystories.download(tmp_path, url)
    got = sorted(p.name for p in (tmp_path / "TinyStories_all_data").iterdir())
    assert got == sorted([*SHARDS, "DOWNLOAD.json"])
    assert (tmp_path / "TinyStories_all_data" / "data01.json").read_bytes() == SHARDS["data01.json"]
    n = len(handler.ranges_seen)
    tinystories.download(tmp_path, url)  # already there: no request
    assert len(handler.ranges_seen) == n


def test_download_resumes_after_cut(server, tmp_path):
    handler, url = server
    handler.payload = make_archive({**SHARDS, "big.bin": np.random.default_rng(0).bytes(200_000)})
    handler.cut_after = 70_000
    with pytest.raises(UserError, match="run the same command again to resume"):
        tinystories.download(tmp_path, url)
    part = tmp_path / "TinyStories_all_data.tar.gz.part"
    saved = part.stat().st_size  # whole chunks that arrived before the cut
    assert 0 < saved <= 70_000
    assert not (tmp_path / "TinyStories_all_data").exists()
    tinystories.download(tmp_path, url)
    assert handler.ranges_seen[-1] == f"bytes={saved}-"
    assert (tmp_path / "TinyStories_all_data.tar.gz").read_bytes() == handler.payload
    assert (tmp_path / "TinyStories_all_data" / "data02.json").read_bytes() == SHARDS["data02.json"]


def test_download_rejects_corrupt_archive(server, tmp_path):
    handler, url = server
    handler.payload = make_archive(SHARDS)[:-200] + b"\0" * 10
    with pytest.raises(UserError, match="corrupt"):
        tinystories.download(tmp_path, url)
    assert not (tmp_path / "TinyStories_all_data").exists()
    assert not (tmp_path / "TinyStories_all_data.tar.gz").exists()  # removed, so a re-run starts clean


def test_download_rejects_path_escape(server, tmp_path):
    handler, url = server
    handler.payload = make_archive({**SHARDS, "../evil.json": b"[]"})
    with pytest.raises(UserError, match="corrupt or unsafe"):
        tinystories.download(tmp_path / "d", url)
    assert not (tmp_path / "evil.json").exists()


def test_download_offline_fails_fast(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(UserError, match="tinystories.py sample"):
        tinystories.download(tmp_path, f"http://127.0.0.1:{port}/x.tar.gz")


# -----------------------------------------------------------------------------
# sample, tokenizer

def test_sample_format_and_determinism(tmp_path):
    a = tinystories.sample(tmp_path / "a", n_stories=3000, n_shards=4)
    b = tinystories.sample(tmp_path / "b", n_stories=3000, n_shards=4)
    shards = sorted(a.glob("data*.json"))
    assert [p.name for p in shards] == ["data00.json", "data01.json", "data02.json", "data03.json"]
    rows = [r for p in shards for r in json.loads(p.read_text())]
    assert len(rows) == 3000 and all(isinstance(r["story"], str) and r["story"] for r in rows)
    assert {"story", "instruction", "summary", "source"} <= set(rows[0])
    for p in shards:
        assert p.read_bytes() == (b / p.name).read_bytes()


def test_sample_refuses_to_overwrite_real_data(tmp_path):
    raw = tmp_path / "TinyStories_all_data"
    raw.mkdir()
    (raw / "data00.json").write_text("[]")
    with pytest.raises(UserError, match="overwrite"):
        tinystories.sample(tmp_path)


def test_tokenizer_round_trip_and_bin_export(tiny_data, tmp_path):
    data, _ = tiny_data
    enc = Tokenizer(data / "tok512.model")
    text = 'Lily said, "Look, a big red ball!" Zoë smiled. 123'
    ids = enc.encode(text, bos=True, eos=False)
    assert ids[0] == 1 and 1 not in ids[1:] and max(ids) < 512
    assert enc.decode(ids) == text
    assert enc.decode(enc.encode("日本")) == "日本"  # byte fallback
    out = enc.export(tmp_path / "tok.bin")
    raw = out.read_bytes()
    (maxlen,) = struct.unpack_from("i", raw)
    pos, pieces = 4, []
    for _ in range(512):
        score, n = struct.unpack_from("fi", raw, pos)
        pieces.append(raw[pos + 8: pos + 8 + n])
        pos += 8 + n
    assert pos == len(raw) and maxlen == max(len(p) for p in pieces)
    assert pieces[1] == b"\n<s>\n" and pieces[3] == b"<0x00>"


def test_train_vocab_is_deterministic(tiny_data, tmp_path):
    data, _ = tiny_data
    shutil.copytree(data / "TinyStories_all_data", tmp_path / "TinyStories_all_data")
    p = tinystories.train_vocab(512, tmp_path)
    # the model file also stores its input path; the vocabulary must be identical
    assert Tokenizer(p).pieces() == Tokenizer(data / "tok512.model").pieces()


# -----------------------------------------------------------------------------
# pretokenize: exact contents on a tiny input

@pytest.fixture
def tiny_raw(tiny_data, tmp_path):
    data, _ = tiny_data
    raw = tmp_path / "TinyStories_all_data"
    raw.mkdir()
    stories = [["The cat sat.", "A dog ran fast."], ["Lily was happy.", "Tom had a red ball.", "Sun!"]]
    for i, s in enumerate(stories):
        (raw / f"data{i:02d}.json").write_text(json.dumps([{"story": t} for t in s]))
    shutil.copy(data / "tok512.model", tmp_path / "tok512.model")
    return tmp_path, stories


def test_pretokenize_exact(tiny_raw):
    root, stories = tiny_raw
    enc = Tokenizer(root / "tok512.model")
    T = 4
    tinystories.pretokenize(512, T, root, workers=1, metrics="none")
    expect = []
    for s, shard in enumerate(stories):
        toks = np.fromfile(root / "tok512" / f"data{s:02d}.bin", dtype=np.uint16)
        want = [t for story in shard for t in [1] + enc.encode(story, bos=False)]
        assert toks.tolist() == want
        starts = [i for i, t in enumerate(want) if t == 1]
        for o in range(0, len(want) - T, T):  # windows [o, o+T+1) that fit
            first = max(i for i, st in enumerate(starts) if st <= o)
            last = max(i for i, st in enumerate(starts) if st <= o + T)
            expect.append((s, o, first, last))
    data = BatchData(root, 512, T)
    got = [(int(r["shard"]), int(r["offset"]), int(r["story_first"]), int(r["story_last"])) for r in data.index]
    assert got == expect
    assert data.n_val == sum(1 for e in expect if e[0] == 0)
    x, y = data.get([0, len(data) - 1])
    w = np.fromfile(root / "tok512" / "data00.bin", dtype=np.uint16)
    assert x[0].tolist() == w[:T].tolist() and y[0].tolist() == w[1:T + 1].tolist()


def test_pretokenize_is_byte_identical_on_rerun(tiny_data, tmp_path):
    data, _ = tiny_data
    shutil.copytree(data / "TinyStories_all_data", tmp_path / "TinyStories_all_data")
    shutil.copy(data / "tok512.model", tmp_path)
    files = lambda: {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "tok512").rglob("*"))
                     if p.is_file() and p.suffix in (".bin", ".npy", ".json")}
    tinystories.pretokenize(512, 64, tmp_path, workers=2, metrics="none")
    first = files()
    shutil.rmtree(tmp_path / "tok512")
    tinystories.pretokenize(512, 64, tmp_path, workers=1, metrics="none")
    assert files() == first and len(first) >= 6


def test_missing_and_corrupt_inputs(tiny_raw, tmp_path):
    root, _ = tiny_raw
    with pytest.raises(UserError, match="tinystories.py download"):
        tinystories.pretokenize(512, 4, tmp_path / "empty", metrics="none")
    with pytest.raises(UserError, match="train_vocab"):
        tinystories.pretokenize(4096, 4, root, metrics="none")
    (root / "TinyStories_all_data" / "data01.json").write_text('[{"story": "ok"}, {"sto')
    with pytest.raises(UserError, match="corrupt shard .*data01.json"):
        load_stories(root / "TinyStories_all_data" / "data01.json")
    with pytest.raises(UserError, match="pretokenize --vocab_size=512 --max_seq_len=8"):
        BatchData(root, 512, 8)  # never indexed at this max_seq_len


def test_batchdata_detects_changed_shard(tiny_raw):
    root, _ = tiny_raw
    tinystories.pretokenize(512, 4, root, workers=1, metrics="none")
    with open(root / "tok512" / "data01.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match="has changed since indexing"):
        BatchData(root, 512, 4)


def test_shard_window_texts_equal_window_texts(tiny_data):
    """The shard-level decode (pieces cut with numpy, plain pieces sliced from the shard's
    text bytes, the rest decoded by sentencepiece) gives window_texts' strings exactly, on
    every shard of real data, at the data's max_seq_len and others; the windows too."""
    data_dir, _ = tiny_data
    enc = Tokenizer(data_dir / "tok512.model")
    assert data._surface_table(enc.sp) is not None  # train_vocab's tokenizers take the fast path
    bins = sorted((data_dir / "tok512").glob("data*.bin"))
    assert (np.fromfile(bins[1], np.uint16) == enc.sp.piece_to_id("<0x0A>")).any()  # byte pieces (newlines) too
    for T in (64, 5, 300):
        for b in bins:
            tokens = np.fromfile(b, np.uint16)
            offs = shard_windows(len(tokens), T)
            wins = [tokens[o:o + T + 1] for o in offs]
            want = window_texts(wins, enc)
            assert shard_window_texts(tokens, offs, T, enc) == want
            assert shard_window_texts(tokens, offs, T, enc, fast=False) == want
            assert np.array_equal(shard_windows_2d(tokens, offs, T), np.array(wins).reshape(len(offs), T + 1))


def test_shard_window_texts_on_odd_tokens(tiny_data):
    """Random windows over token runs rich in what decoding treats specially (BOS, the
    whitespace piece, ASCII and other byte pieces, <unk>, EOS) decode as window_texts does."""
    enc = Tokenizer(tiny_data[0] / "tok512.model")
    sp = enc.sp
    odd = [0, 1, 2, sp.piece_to_id("\u2581"), sp.piece_to_id("<0x0A>"), sp.piece_to_id("<0x20>"),
           sp.piece_to_id("<0xC3>"), sp.piece_to_id("<0xA9>"), sp.piece_to_id("\u2581the"), sp.piece_to_id("at")]
    for seed in range(60):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(20, 1500))
        tokens = np.where(rng.random(n) < 0.5, rng.choice(odd, n), rng.integers(0, 512, n)).astype(np.uint16)
        T = int(rng.integers(1, 40))
        offs = rng.integers(0, max(n - T - 1, 1), int(rng.integers(1, 30)))
        want = window_texts([tokens[o:o + T + 1] for o in offs], enc)
        assert shard_window_texts(tokens, offs, T, enc) == want, seed
    assert shard_window_texts(np.zeros(0, np.uint16), np.zeros(0, np.int64), 4, enc) == []


def test_bundled_tokenizer_is_reproducible(tmp_path):
    """tokenizer.model is what `sample` + `train_vocab --vocab_size=512` make (README)."""
    from conftest import ROOT
    tinystories.sample(tmp_path)
    p = tinystories.train_vocab(512, tmp_path)
    assert Tokenizer(p).pieces() == Tokenizer(ROOT / "tokenizer.model").pieces()


@pytest.mark.parametrize("stage,kw,match", [
    ("sample", {"n_stories": 0}, "n_stories=0"), ("sample", {"n_shards": 1}, "n_shards=1"),
    ("sample", {"n_stories": 3, "n_shards": 4}, "n_stories=3"),
    ("train_vocab", {"vocab_size": 0}, "vocab_size=0"), ("train_vocab", {"vocab_size": -5}, "vocab_size=-5"),
    ("train_vocab", {"vocab_size": 70000}, "vocab_size=70000"),
    ("train_vocab", {"vocab_size": 259}, "vocab_size=259"),  # valid range, but too few for the sample's chars
    ("pretokenize", {"max_seq_len": 0}, "max_seq_len=0"), ("pretokenize", {"workers": 0}, "workers=0")])
def test_nonsense_values_write_nothing(tiny_raw, tmp_path, stage, kw, match):
    """A one-line error naming the value; nothing new on disk (train_vocab leaves no tokN.txt)."""
    root, _ = tiny_raw
    target = tmp_path / "fresh" if stage == "sample" else root
    before = sorted(p.relative_to(target) for p in target.rglob("*")) if target.exists() else []
    with pytest.raises(UserError, match=match) as e:
        getattr(tinystories, stage)(data_dir=target, **kw)
    assert "\n" not in str(e.value)
    after = sorted(p.relative_to(target) for p in target.rglob("*")) if target.exists() else []
    assert after == before


# -----------------------------------------------------------------------------
# a damaged download is cleared, a wrong range refused, reused shards checked

def test_download_corrupt_gzip_stream_is_cleared_and_a_good_url_then_works(server, tmp_path):
    handler, url = server
    good = make_archive({**SHARDS, "big.bin": np.random.default_rng(1).bytes(100_000)})
    bad = bytearray(good)
    bad[len(bad) // 2: len(bad) // 2 + 64] = b"\xff" * 64  # inside the deflate stream: zlib.error mid-way
    handler.payload = bytes(bad)
    with pytest.raises(UserError, match="is corrupt or unsafe"):
        tinystories.download(tmp_path, url)
    assert not (tmp_path / "TinyStories_all_data.tar.gz").exists()
    assert not (tmp_path / "TinyStories_all_data.extracting").exists() and not (tmp_path / "TinyStories_all_data").exists()
    handler.payload = good
    tinystories.download(tmp_path, url)  # nothing half-done blocks the rerun
    assert (tmp_path / "TinyStories_all_data" / "data01.json").read_bytes() == SHARDS["data01.json"]


def test_download_refuses_a_range_at_the_wrong_offset(server, tmp_path):
    handler, url = server
    handler.payload = make_archive(SHARDS)
    part = tmp_path / "TinyStories_all_data.tar.gz.part"
    part.write_bytes(handler.payload[:100])

    def wrong_range(self):  # a 206 that starts at 0, whatever was asked
        data = type(self).payload
        self.send_response(206)
        self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    handler.do_GET = wrong_range
    with pytest.raises(UserError, match="asked for bytes from 100 but the server sent a range starting at 0"):
        tinystories.download(tmp_path, url)
    assert not part.exists() and not (tmp_path / "TinyStories_all_data.tar.gz").exists()


def test_reused_download_is_checked_against_its_record(server, tmp_path):
    handler, url = server
    handler.payload = make_archive(SHARDS)
    tinystories.download(tmp_path, url)
    raw = tmp_path / "TinyStories_all_data"
    rec = json.loads((raw / "DOWNLOAD.json").read_text())
    assert rec["archive"]["size"] == len(handler.payload) and set(rec["shards"]) == set(SHARDS)
    shard = raw / "data02.json"
    shard.write_bytes(shard.read_bytes().replace(b"Story 2", b"Story 9"))  # same size, other stories
    with pytest.raises(UserError, match="data02.json changed since the download"):
        tinystories.download(tmp_path, url)
    shard.unlink()
    shard.symlink_to(raw / "data00.json")
    with pytest.raises(UserError, match="changed since the download"):
        tinystories.download(tmp_path, url)


@pytest.mark.parametrize("kind", ["symlink", "folder", "empty"])
def test_raw_shards_must_be_plain_files(tmp_path, kind):
    raw = tmp_path / "TinyStories_all_data"
    raw.mkdir()
    (raw / "data00.json").write_text('[{"story": "a"}]')
    bad = raw / "data01.json"
    {"symlink": lambda: bad.symlink_to(raw / "data00.json"), "folder": bad.mkdir,
     "empty": lambda: bad.write_bytes(b"")}[kind]()
    with pytest.raises(UserError, match=f"raw shard {re.escape(str(bad))} is"):
        data.raw_shards(tmp_path)


def test_a_rewritten_bin_shard_is_refused_and_pretokenize_repairs_it(tiny_data, tmp_path):
    """Other valid ids of the same size in a .bin trained silently, and pretokenize skipped
    the shard (its key checked only the raw shard and the tokenizer)."""
    data, _ = tiny_data
    shutil.copytree(data / "TinyStories_all_data", tmp_path / "TinyStories_all_data")
    shutil.copy(data / "tok512.model", tmp_path)
    tinystories.pretokenize(512, 64, tmp_path, workers=1, metrics="none")
    good = BatchData(tmp_path, 512, 64).window(100).copy()
    p = tmp_path / "tok512" / "data01.bin"
    tok = np.fromfile(p, dtype=np.uint16)
    tok[tok > 300] -= 1  # other valid ids, same size
    tok.tofile(p)
    with pytest.raises(UserError, match="data01.bin has changed since indexing"):
        BatchData(tmp_path, 512, 64)
    tinystories.pretokenize(512, 64, tmp_path, workers=1, metrics="none")  # re-tokenizes the damaged shard
    assert np.array_equal(BatchData(tmp_path, 512, 64).window(100), good)


def test_batch_index_record_and_ids_outside_the_vocabulary(tiny_data, tmp_path):
    data, _ = tiny_data
    shutil.copytree(data / "tok512", tmp_path / "tok512")
    meta_p = tmp_path / "tok512" / "index_T64" / "meta.json"
    meta = json.loads(meta_p.read_text())
    meta_p.write_text(json.dumps({k: v for k, v in meta.items() if k != "n_val_batches"}))
    with pytest.raises(UserError, match="meta.json lacks 'n_val_batches'"):
        BatchData(tmp_path, 512, 64)
    meta_p.write_text("[]")
    with pytest.raises(UserError, match="meta.json holds a JSON list"):
        BatchData(tmp_path, 512, 64)
    old = {**meta, "shards": [{k: v for k, v in s.items() if k not in ("sha256", "max_token")} for s in meta["shards"]]}
    meta_p.write_text(json.dumps(old))  # an index made before the hash was recorded: the ids are scanned
    BatchData(tmp_path, 512, 64)
    p = tmp_path / "tok512" / "data02.bin"
    tok = np.fromfile(p, dtype=np.uint16)
    tok[5] = 600
    tok.tofile(p)
    with pytest.raises(UserError, match="data02.bin holds token ids outside the vocabulary of 512"):
        BatchData(tmp_path, 512, 64)


# -----------------------------------------------------------------------------
# pretokenize refuses a copied raw shard and a bad metrics request before rewriting the index

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

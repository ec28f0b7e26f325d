"""
The tokens side of the project, shared by every stage: raw TinyStories shards, the
pretokenized .bin shards (llama2.c's format: uint16, BOS before each story), the batch
index that numbers every batch, and BatchData, the reader that serves batches by id.

A *batch* (llama2.c's word) is one window of max_seq_len+1 tokens at offset
i*max_seq_len of one shard. Batches are numbered in shard order, shard 0 first; shard 0
is the validation split (llama2.c's rule). The index maps every batch_id back to its
shard, offset and the first/last story it overlaps.

Default paths follow one rule, llama2.c's: relative to the working folder
(data/, out/, out/tables/), so running from the repository root gives the seed's paths.

$ python -c "from data import BatchData; d = BatchData(); print(len(d), d.window(0)[:8])"
"""

import glob
import hashlib
import json
from pathlib import Path

import numpy as np

from common import DoneRecord, UserError, atomic_path, write_json_atomic

# -----------------------------------------------------------------------------
DATA_DIR = Path("data")
TABLES_DIR = Path("out") / "tables"
RAW_NAME = "TinyStories_all_data"
MAX_SEQ_LEN = 256
VOCAB_SIZE = 512
BOS_ID, EOS_ID = 1, 2  # sentencepiece's (and llama2.c's) ids; run.c stops at BOS
INDEX_FORMAT, INDEX_VERSION = "llama2_prebiasing.batch_index", 1
INDEX_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("story_first", "<i4"), ("story_last", "<i4")])
# -----------------------------------------------------------------------------


def raw_dir(data_dir) -> Path:
    return Path(data_dir) / RAW_NAME


def raw_shards(data_dir) -> list[Path]:
    shards = sorted(Path(p) for p in glob.glob(str(raw_dir(data_dir) / "data*.json")))
    if not shards:
        raise UserError(f"no shards in {raw_dir(data_dir)}: run python tinystories.py download "
                        "(or python tinystories.py sample offline)")
    return shards


def tok_dir(data_dir, vocab_size) -> Path:
    return Path(data_dir) / f"tok{vocab_size}"


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def story_noise(shard: Path) -> np.ndarray:
    """Per story of a raw shard: True where `tinystories.py sample --noise` corrupted it
    (its row has a "noise" kind); all False for clean or downloaded data."""
    try:
        rows = json.loads(Path(shard).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"corrupt shard {shard} ({type(e).__name__}): delete it and re-run "
                        "python tinystories.py download (or sample)") from None
    return np.array([bool(r.get("noise")) for r in rows], dtype=bool)


def window_noise(tokens: np.ndarray, noisy: np.ndarray, offsets: np.ndarray, max_seq_len: int) -> np.ndarray:
    """Share of each window's max_seq_len+1 tokens that belong to noisy stories (a story
    owns its BOS and the tokens up to the next BOS)."""
    story = np.cumsum(np.asarray(tokens) == BOS_ID) - 1  # story index of every token
    flag = np.zeros(len(story), dtype=bool)
    flag[story >= 0] = noisy[story[story >= 0]]
    cum = np.concatenate([[0], np.cumsum(flag)])
    return (cum[offsets + max_seq_len + 1] - cum[offsets]) / (max_seq_len + 1)


def load_stories(shard: Path) -> list[str]:
    try:
        data = json.loads(Path(shard).read_text(encoding="utf-8"))
        return [ex["story"].strip() for ex in data]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"corrupt shard {shard} ({type(e).__name__}: {e}): delete it and re-run "
                        "python tinystories.py download (or sample)") from None


# -----------------------------------------------------------------------------
# the batch index

def shard_windows(n_tokens: int, max_seq_len: int) -> np.ndarray:
    """Offsets of the batches in a shard of n_tokens: windows [o, o+T+1), o = i*T."""
    n = max((n_tokens - 1) // max_seq_len, 0)
    return np.arange(n, dtype=np.int64) * max_seq_len


def build_index(tokens_by_shard: list[np.ndarray], max_seq_len: int) -> np.ndarray:
    """Structured array, one row per batch: shard, offset, first and last story (index
    within the shard) that the window's tokens overlap. Row number == batch_id."""
    rows = []
    for s, tok in enumerate(tokens_by_shard):
        offs = shard_windows(len(tok), max_seq_len)
        starts = np.flatnonzero(tok == BOS_ID)
        r = np.zeros(len(offs), dtype=INDEX_DTYPE)
        r["shard"], r["offset"] = s, offs
        r["story_first"] = np.searchsorted(starts, offs, side="right") - 1
        r["story_last"] = np.searchsorted(starts, offs + max_seq_len, side="right") - 1
        rows.append(r)
    return np.concatenate(rows) if rows else np.zeros(0, dtype=INDEX_DTYPE)



def index_dir(data_dir, vocab_size, max_seq_len) -> Path:
    return tok_dir(data_dir, vocab_size) / f"index_T{max_seq_len}"


def write_index(data_dir, vocab_size, max_seq_len, tokenizer_name, tokenizer_sha) -> Path:
    """Index every .bin shard of data/tok{V}/ at max_seq_len (batches.npy + meta.json)."""
    bins = sorted(tok_dir(data_dir, vocab_size).glob("data*.bin"))
    toks = [np.memmap(p, dtype=np.uint16, mode="r") for p in bins]
    index = build_index(toks, max_seq_len)
    idir = index_dir(data_dir, vocab_size, max_seq_len)
    idir.mkdir(parents=True, exist_ok=True)
    with atomic_path(idir / "batches.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, index, allow_pickle=False)
    meta = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "vocab_size": vocab_size,
        "max_seq_len": max_seq_len, "tokenizer": tokenizer_name, "tokenizer_sha256": tokenizer_sha,
        "n_batches": len(index), "n_val_batches": int((index["shard"] == 0).sum()),
        "shards": [{"name": p.name, "n_tokens": len(t), "n_stories": int((np.asarray(t) == 1).sum())}
                   for p, t in zip(bins, toks)],
    }
    write_json_atomic(idir / "meta.json", meta)
    print(f"wrote {len(toks)} shards to {tok_dir(data_dir, vocab_size)} and {len(index)} batches "
          f"({meta['n_val_batches']} validation) to {idir}")
    return idir


# -----------------------------------------------------------------------------
# reading batches back

class BatchData:
    """The pretokenized batches of one (vocab_size, max_seq_len), by batch_id.

    get(ids) -> x, y int64 tensors (len(ids), max_seq_len): the window's tokens and
    the same shifted by one, exactly as llama2.c's PretokDataset cuts them."""

    def __init__(self, data_dir=DATA_DIR, vocab_size=VOCAB_SIZE, max_seq_len=MAX_SEQ_LEN):
        self.dir = index_dir(data_dir, vocab_size, max_seq_len)
        meta_path, idx_path = self.dir / "meta.json", self.dir / "batches.npy"
        fix = f"run python tinystories.py pretokenize --vocab_size={vocab_size} --max_seq_len={max_seq_len}"
        if not meta_path.exists() or not idx_path.exists():
            raise UserError(f"no batch index in {self.dir}: {fix}")
        try:
            self.meta = json.loads(meta_path.read_text())
            self.index = np.load(idx_path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"corrupt batch index in {self.dir} ({e}): {fix}") from None
        m = self.meta
        if (m.get("format"), m.get("version")) != (INDEX_FORMAT, INDEX_VERSION) or \
                m["vocab_size"] != vocab_size or m["max_seq_len"] != max_seq_len or \
                self.index.dtype != INDEX_DTYPE or len(self.index) != m["n_batches"]:
            raise UserError(f"batch index {self.dir} does not match vocab_size={vocab_size}, "
                            f"max_seq_len={max_seq_len} or this version: {fix}")
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.tokens = []
        for s in m["shards"]:
            p = tok_dir(data_dir, vocab_size) / s["name"]
            if not p.exists() or p.stat().st_size != 2 * s["n_tokens"]:
                raise UserError(f"shard {p} is missing or has changed since indexing: {fix}")
            self.tokens.append(np.memmap(p, dtype=np.uint16, mode="r"))
        self.n_val = m["n_val_batches"]

    def __len__(self):
        return len(self.index)

    @property
    def train_ids(self) -> np.ndarray:
        return np.arange(self.n_val, len(self.index), dtype=np.int64)

    @property
    def val_ids(self) -> np.ndarray:
        return np.arange(0, self.n_val, dtype=np.int64)

    def window(self, batch_id: int) -> np.ndarray:
        """The max_seq_len+1 tokens of one batch."""
        r = self.index[batch_id]
        return np.asarray(self.tokens[r["shard"]][r["offset"]:r["offset"] + self.max_seq_len + 1])

    def windows(self, ids) -> np.ndarray:
        return np.stack([self.window(int(i)) for i in ids]).astype(np.int64)

    def get(self, ids):
        import torch
        w = torch.from_numpy(self.windows(ids))
        return w[:, :-1], w[:, 1:]


def window_texts(windows: list[np.ndarray], enc) -> list[str]:
    """Text of each token window as the model sees it: the stories in it cut at BOS,
    one per line. One batched decode call for all pieces (sentencepiece's C++ loop)."""
    pieces, owner = [], []
    for i, w in enumerate(windows):
        toks = w.tolist() if isinstance(w, np.ndarray) else list(w)
        start = 0
        while True:  # cut at each BOS (plain list ops: cheaper than numpy on 257 tokens)
            try:
                end = toks.index(BOS_ID, start)
            except ValueError:
                end = len(toks)
            if end > start:
                pieces.append(toks[start:end])
                owner.append(i)
            if end == len(toks):
                break
            start = end + 1
    texts = [[] for _ in windows]
    for i, t in zip(owner, enc.sp.decode(pieces) if pieces else []):
        if t:
            texts[i].append(t)
    return ["\n".join(t) for t in texts]


def window_text(tokens: np.ndarray, enc) -> str:
    return window_texts([tokens], enc)[0]


def token_stamps(data_dir, vocab_size) -> DoneRecord:
    """pretokenize's 'already computed' record (data/tok{V}/stamps.json): per raw shard
    name, the key "raw_sha256:tokenizer_sha256" its .bin was made from. Batch metrics
    key their per-shard cache on the same string."""
    return DoneRecord(tok_dir(data_dir, vocab_size) / "stamps.json", {"stage": "pretokenize", "format": 1})

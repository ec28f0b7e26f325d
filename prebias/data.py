"""
The tokens side of the project, shared by every stage: raw TinyStories shards, the
pretokenized .bin shards (llama2.c's format: uint16, BOS before each story), the batch
index that numbers every batch, and BatchData, the reader that serves batches by id.

A *batch* (llama2.c's word) is one window of max_seq_len+1 tokens at offset
i*max_seq_len of one shard. Batches are numbered in shard order, shard 0 first; shard 0
is the validation split (llama2.c's rule). The index maps every batch_id back to its
shard, offset and the first/last story it overlaps. The holdout (write_holdout) marks
seeded blocks of whole training stories, and the batches touching them, for the
irreducible-loss model of RHO-LOSS; it changes no batch id.

Default paths follow one rule, llama2.c's: relative to the working folder
(data/, out/, out/tables/), so running from the repository root gives the seed's paths.

$ python -c "from prebias.data import BatchData; d = BatchData(); print(len(d), d.window(0)[:8])"
"""

import glob
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from prebias.common import SEED, DoneRecord, UserError, atomic_path, json_loads, write_json_atomic
from prebias.inputs import read_json
from prebias.paths import RunPaths

# -----------------------------------------------------------------------------
DATA_DIR = Path("data")
TABLES_DIR = RunPaths("out").tables
RAW_NAME = "TinyStories_all_data"
MAX_SEQ_LEN = 256
VOCAB_SIZE = 512
BOS_ID, EOS_ID = 1, 2  # sentencepiece's (and llama2.c's) ids; run.c stops at BOS
INDEX_FORMAT, INDEX_VERSION = "llama2_prebiasing.batch_index", 1
LLAMA2_TOKENIZER = "tokenizer.model"  # llama2.c's name for Meta's Llama 2 sentencepiece model
LLAMA2_RECORD = "llama2_tokenizer.json"  # beside the JSON: which tokenizer vocab_size=0 used
INDEX_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("story_first", "<i4"), ("story_last", "<i4")])
HOLDOUT_FRACTION, HOLDOUT_SEED, HOLDOUT_BLOCK = 0.1, SEED, 32  # pretokenize --holdout: share of training stories
HOLDOUT_MODES = ("auto", "exclude", "keep", "only")  # train.py --holdout (stream.holdout_mode)
# -----------------------------------------------------------------------------


def raw_dir(data_dir) -> Path:
    return Path(data_dir) / RAW_NAME


def raw_shards(data_dir) -> list[Path]:
    """The raw shards data*.json, each a plain, non-empty file: a symbolic link (say to the
    validation shard) would be trained on as new data, a folder or an empty file read as
    nothing."""
    shards = sorted(Path(p) for p in glob.glob(str(raw_dir(data_dir) / "data*.json")))
    check_sample(raw_dir(data_dir), shards)
    if not shards:
        raise UserError(f"no shards in {raw_dir(data_dir)}: run python tinystories.py download "
                        "(or python tinystories.py sample offline)")
    for p in shards:
        what = ("a symbolic link" if p.is_symlink() else "a folder" if p.is_dir() else
                "not a regular file" if not p.is_file() else "empty" if p.stat().st_size == 0 else "")
        if what:
            raise UserError(f"raw shard {p} is {what}: every data*.json must be a plain file of stories; remove it "
                            "(or rerun python tinystories.py download / sample into a fresh --data_dir)")
    return shards


SAMPLE = "SAMPLE"  # beside a generated sample's shards (tinystories.py sample): its settings and shards


def check_sample(raw: Path, shards: list[Path]):
    """A generated sample is whole or refused: sample writes SAMPLE saying complete: false
    before its first shard and, after its last, complete: true with the shards' names, so a
    sample cut short (a kill, a full disk), or one that lost a shard, is never read as a
    smaller data set."""
    p = raw / SAMPLE
    if not p.is_file():
        return  # downloaded (or placed by hand): tinystories.check_download answers for it
    try:
        rec = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        rec = None
    fix = f"run python tinystories.py sample --data_dir={raw.parent} again (with the options it was made with)"
    if not isinstance(rec, dict) or rec.get("complete") is False:
        raise UserError(f"{raw} holds an unfinished sample (the command writing it was stopped, {p} says so): {fix}")
    gone = sorted(set(map(str, rec.get("shards", []) if isinstance(rec.get("shards"), list) else [])) -
                  {q.name for q in shards})  # a shard added by hand is the user's (and checked as any other)
    if gone:
        raise UserError(f"{raw} lacks {gone[0]} of the {len(rec['shards'])} shards its sample wrote ({p} names "
                        f"them): {fix}")


def llama2_vocab(data_dir) -> int:
    """The vocab size of the tokenizer that `pretokenize --vocab_size=0` used for the shards
    beside the JSON (its record, LLAMA2_RECORD), or 0 when there are none."""
    try:
        return int(json.loads((raw_dir(data_dir) / LLAMA2_RECORD).read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def tok_dir(data_dir, vocab_size) -> Path:
    """Where a vocabulary's .bin shards (and its batch index, stamps, scorer) live:
    data/tok{V}/ for a custom vocabulary (train_vocab); beside the JSON shards, in
    data/TinyStories_all_data/, for llama2.c's vocab_size=0 (a Llama 2 sentencepiece model
    the user supplies). That folder then also answers for its tokenizer's vocab size (say
    32000), so train.py --vocab_size=32000 and every later stage find it; a custom
    vocabulary of the same size beside it is refused as ambiguous."""
    custom = Path(data_dir) / f"tok{vocab_size}"
    if vocab_size == 0:
        return raw_dir(data_dir)
    if llama2_vocab(data_dir) == vocab_size:
        if custom.exists() or custom.with_suffix(".model").exists():
            raise UserError(f"{custom} (a custom vocabulary) and {raw_dir(data_dir)} (pretokenize --vocab_size=0) "
                            f"both hold {vocab_size}-token data: remove one, or use another --data_dir")
        return raw_dir(data_dir)
    return custom


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
        rows = json_loads(Path(shard).read_text(encoding="utf-8"), unique=False)
    except (OSError, ValueError) as e:
        raise UserError(f"corrupt shard {shard} ({type(e).__name__}): delete it and re-run "
                        "python tinystories.py download (or sample)") from None
    return np.array([bool(r.get("noise")) for r in rows], dtype=bool)


def story_noise_free(shard: Path) -> bool:
    """True when no story of a raw shard can have a "noise" field: the key is nowhere in
    the file, neither as written nor with a letter \\u-escaped (json.dumps and TinyStories
    never escape ASCII letters). story_noise would then be all False; this skips parsing."""
    try:
        raw = Path(shard).read_bytes().lower()
    except OSError:
        return False  # story_noise says what is wrong
    return b'"noise"' not in raw and not any(b"\\u00" + h in raw for h in (b"6e", b"6f", b"69", b"73", b"65"))


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
        data = json_loads(Path(shard).read_text(encoding="utf-8"), unique=False)
        if not isinstance(data, list) or not all(isinstance(ex, dict) and isinstance(ex.get("story"), str)
                                                 for ex in data):
            raise ValueError("a shard is a JSON list of objects, each with a 'story' string")
        return [ex["story"].strip() for ex in data]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as e:
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
        "shards": [{"name": p.name, "n_tokens": len(t), "n_stories": int((np.asarray(t) == 1).sum()),
                    "max_token": int(np.max(t, initial=0)), "sha256": sha256_file(p)}
                   for p, t in zip(bins, toks)],
    }
    bad = [(sh, t) for sh, t in zip(meta["shards"], toks) if sh["max_token"] >= vocab_size]
    if bad:
        raise UserError(f"{tok_dir(data_dir, vocab_size) / bad[0][0]['name']} holds token id {bad[0][0]['max_token']}, "
                        f"outside the vocabulary of {vocab_size}: it was made with another tokenizer; delete "
                        f"{tok_dir(data_dir, vocab_size)} and rerun python tinystories.py pretokenize")
    write_json_atomic(idir / "meta.json", meta)
    print(f"wrote {len(toks)} shards to {tok_dir(data_dir, vocab_size)} and {len(index)} batches "
          f"({meta['n_val_batches']} validation) to {idir}")
    return idir


# -----------------------------------------------------------------------------
# the holdout: training stories kept apart for the irreducible-loss model (RHO-LOSS)

def choose_holdout(n_stories: list[int], fraction: float, seed: int = HOLDOUT_SEED,
                   block: int = HOLDOUT_BLOCK) -> np.ndarray:
    """The held-out stories as rows [shard, first story, end story) (sorted): each training
    shard (1..) cut into blocks of `block` consecutive stories (its last one shorter), and
    round(fraction * blocks) blocks drawn without replacement by numpy's
    default_rng([seed, 'hold']). Whole stories of the training shards, so noisy where they
    are noisy, never the validation shard; the same for every vocab_size and max_seq_len
    (a story's index in its shard does not depend on them)."""
    rows = np.array([(s, lo, min(lo + block, n)) for s, n in enumerate(n_stories) if s > 0
                     for lo in range(0, n, block)], dtype=np.int64).reshape(-1, 3)
    k = int(round(fraction * len(rows)))
    rng = np.random.default_rng([int(seed), 0x686F6C64])  # 'hold'
    return rows[np.sort(rng.choice(len(rows), k, replace=False))] if k else rows[:0]


def holdout_batches(index: np.ndarray, stories: np.ndarray) -> np.ndarray:
    """The batch ids whose window touches a held-out story (rows of choose_holdout): every
    token a reference fitted on those stories saw lies in these batches, so a run that
    leaves them out never trains on one (a block's edge windows, part held-out, go too)."""
    out = []
    for s in np.unique(stories[:, 0]) if len(stories) else []:
        ids = np.flatnonzero(index["shard"] == s)
        held = np.zeros(int(index["story_last"][ids].max(initial=0)) + 2, np.int64)
        for _, lo, hi in stories[stories[:, 0] == s]:
            held[lo:hi] = 1
        c = np.concatenate([[0], np.cumsum(held)])
        first, last = index["story_first"][ids], index["story_last"][ids]
        out.append(ids[c[np.minimum(last + 1, len(held))] - c[np.maximum(first, 0)] > 0])
    return np.sort(np.concatenate(out)).astype(np.int64) if out else np.zeros(0, np.int64)


def write_holdout(data_dir, vocab_size, max_seq_len, fraction: float = HOLDOUT_FRACTION,
                  seed: int = HOLDOUT_SEED, block: int = HOLDOUT_BLOCK) -> np.ndarray:
    """Mark the holdout: data/tok{V}/holdout.json (its stories, the rule; what the reference
    scorer is fitted on) and, beside the batch index, holdout.npy (the batch ids touching
    them) with holdout.json (their count and sha256). batches.npy stays as it was: the
    holdout is a marking, no batch id changes. fraction 0: no holdout."""
    if not 0 <= fraction < 1:
        raise UserError(f"--holdout={fraction}: a fraction of the training stories in [0, 1)")
    idir = index_dir(data_dir, vocab_size, max_seq_len)
    meta = json.loads((idir / "meta.json").read_text())
    stories = choose_holdout([sh["n_stories"] for sh in meta["shards"]], fraction, seed, block)
    story_rec = {"fraction": fraction, "seed": seed, "block": block, "stories": stories.tolist(),
                 "shards": [sh["name"] for sh in meta["shards"]],
                 "n_stories": int((stories[:, 2] - stories[:, 1]).sum()),
                 "sha256": hashlib.sha256(stories.tobytes()).hexdigest(),
                 "rule": "blocks of `block` consecutive stories of each training shard; round(fraction * blocks) "
                         "of them drawn without replacement by numpy default_rng([seed, 0x686F6C64])"}
    write_json_atomic(tok_dir(data_dir, vocab_size) / "holdout.json", story_rec)
    ids = holdout_batches(np.load(idir / "batches.npy", allow_pickle=False), stories)
    with atomic_path(idir / "holdout.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, ids, allow_pickle=False)
    write_json_atomic(idir / "holdout.json", {"n_batches": len(ids), "sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
                                              "stories_sha256": story_rec["sha256"], "fraction": fraction})
    return ids


def holdout_stories(data_dir, vocab_size) -> dict:
    """data/tok{V}/holdout.json (write_holdout), {} when there is none."""
    p = tok_dir(data_dir, vocab_size) / "holdout.json"
    return json.loads(p.read_text()) if p.exists() else {}


def holdout_tokens(data_dir, vocab_size) -> list[np.ndarray]:
    """The held-out stories' tokens, one array per story (BOS first), in shard order."""
    rec, out = holdout_stories(data_dir, vocab_size), []
    for s, lo, hi in rec.get("stories", []):
        tok = np.memmap(tok_dir(data_dir, vocab_size) / rec["shards"][s], dtype=np.uint16, mode="r")
        starts = np.append(np.flatnonzero(tok == BOS_ID), len(tok))
        out += [np.asarray(tok[starts[i]:starts[i + 1]]) for i in range(lo, hi)]
    return out


# -----------------------------------------------------------------------------
# reading batches back

def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 53


def check_bin(p: Path, rec: dict, vocab_size: int, fix: str):
    """A .bin shard is the one its index describes: the sha256 recorded at indexing (a
    rewrite with other valid ids of the same size would otherwise train silently; ~1.5 s
    per GB), and every id in the vocabulary (an index older than the recorded hash: the
    shard is scanned)."""
    if "sha256" in rec:
        if not isinstance(rec["sha256"], str) or sha256_file(p) != rec["sha256"]:
            raise UserError(f"shard {p} has changed since indexing (its sha256 differs from the batch index's): {fix}")
        if not _is_count(rec.get("max_token", 0)) or rec.get("max_token", 0) >= vocab_size:
            raise UserError(f"shard {p} holds token ids outside the vocabulary of {vocab_size}: {fix}")
    elif int(np.max(np.memmap(p, dtype=np.uint16, mode="r"), initial=0)) >= vocab_size:
        raise UserError(f"shard {p} holds token ids outside the vocabulary of {vocab_size}: {fix}")


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
        self.meta = read_json(meta_path, "a batch index's record", fix, keys=(
            "format", "version", "vocab_size", "max_seq_len", "n_batches", "n_val_batches", "shards", "tokenizer_sha256"))
        try:
            self.index = np.load(idx_path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"corrupt batch index in {self.dir} ({type(e).__name__}: {e}): {fix}") from None
        m = self.meta
        if (m.get("format"), m.get("version")) != (INDEX_FORMAT, INDEX_VERSION) or \
                m["vocab_size"] != vocab_size or m["max_seq_len"] != max_seq_len:
            raise UserError(f"batch index {self.dir} does not match vocab_size={vocab_size}, "
                            f"max_seq_len={max_seq_len} or this version: {fix}")
        if not isinstance(m["shards"], list) or not m["shards"] or not all(
                isinstance(x, dict) and isinstance(x.get("name"), str) and re.fullmatch(r"[\w-]+\.bin", x["name"])
                and _is_count(x.get("n_tokens")) for x in m["shards"]) or \
                not all(_is_count(m[k]) for k in ("n_batches", "n_val_batches")):
            raise UserError(f"{meta_path}: its counts or its 'shards' (each shard's name and n_tokens) are damaged: {fix}")
        ok = self.index.ndim == 1 and self.index.dtype == INDEX_DTYPE and len(self.index) == m["n_batches"] and \
            0 <= m["n_val_batches"] <= m["n_batches"]
        if ok and len(self.index):  # every window inside its shard
            sh = self.index["shard"].astype(np.int64)
            ok = sh.min() >= 0 and sh.max() < len(m["shards"]) and self.index["offset"].min() >= 0
            n_tok = np.array([x["n_tokens"] for x in m["shards"]], np.int64)
            ok = ok and bool((self.index["offset"].astype(np.int64) + max_seq_len + 1 <= n_tok[sh]).all())
        if not ok:
            raise UserError(f"batch index {self.dir} is inconsistent (its batches.npy and meta.json disagree): {fix}")
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.tokens = []
        for s in m["shards"]:
            p = tok_dir(data_dir, vocab_size) / s["name"]
            if not p.is_file() or p.stat().st_size != 2 * s["n_tokens"]:
                raise UserError(f"shard {p} is missing or has changed since indexing: {fix}")
            check_bin(p, s, vocab_size, fix)
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

    @property
    def holdout_ids(self) -> np.ndarray:
        """The holdout's batch ids (write_holdout; sorted), empty when the index has none
        (pretokenize --holdout=0, or an index made before the holdout existed)."""
        if not hasattr(self, "_holdout"):
            p = self.dir / "holdout.npy"
            ids = np.load(p, allow_pickle=False).astype(np.int64) if p.exists() else np.zeros(0, np.int64)
            if p.exists() and (ids.min(initial=self.n_val) < self.n_val or ids.max(initial=0) >= len(self.index)
                               or hashlib.sha256(ids.tobytes()).hexdigest() != self.holdout_meta.get("sha256")):
                raise UserError(f"{p} does not match the batch index in {self.dir}: re-run python tinystories.py "
                                f"pretokenize --vocab_size={self.vocab_size} --max_seq_len={self.max_seq_len}")
            self._holdout = ids
        return self._holdout

    @property
    def holdout_meta(self) -> dict:
        """index_T{T}/holdout.json: the holdout batches' count and sha256 ({} without one)."""
        p = self.dir / "holdout.json"
        return json.loads(p.read_text()) if p.exists() else {}

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


def shard_windows_2d(tokens: np.ndarray, offsets: np.ndarray, max_seq_len: int) -> np.ndarray:
    """The windows tokens[o:o+max_seq_len+1] of one shard as one (len(offsets), max_seq_len+1)
    array: one gather instead of a memmap slice per window."""
    offsets = np.asarray(offsets, dtype=np.int64)
    return np.asarray(tokens)[offsets[:, None] + np.arange(max_seq_len + 1)]


def _surface_table(sp):
    """For decoding token spans by slicing bytes: the UTF-8 surface of every "plain" id
    (a normal piece with '▁' as a space, or the byte piece of an ASCII byte) laid end
    to end, its offsets and lengths, which ids are plain, and their lead (1: a normal
    piece starting with '▁', 2: the piece '▁' alone, else 0); None when this
    tokenizer decodes otherwise. In sentencepiece (pinned in requirements.txt) a span of
    plain ids decodes to its surfaces joined, except that leading '▁' pieces are
    dropped and then one leading '▁' of the next normal piece (add_dummy_prefix and
    remove_extra_whitespaces, as train_vocab makes it); byte pieces are never stripped.
    Checked here against sentencepiece for every plain id alone, after a plain piece,
    after one and two '▁' and before a '▁' piece: another kind of tokenizer
    takes the plain path."""
    V = sp.vocab_size()
    byte = np.array([sp.IsByte(i) for i in range(V)], bool)
    normal = np.array([not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i)) for i in range(V)], bool) & ~byte
    surf = [""] * V
    for i in range(V):
        piece = sp.id_to_piece(i)
        if normal[i]:
            surf[i] = piece.replace("▁", " ")
        elif byte[i] and len(piece) == 6 and piece.startswith("<0x") and int(piece[3:5], 16) < 0x80:
            surf[i] = chr(int(piece[3:5], 16))
    plain = normal | (byte & np.array([s != "" for s in surf], bool))
    lead = np.where(normal & np.array([s.startswith(" ") for s in surf], bool), 1, 0)
    lead[normal & np.array([s == " " for s in surf], bool)] = 2

    def rule(seq):  # the decoding described above, for the check
        out, at_start = [], True
        for i in seq:
            s = surf[i][1:] if at_start and lead[i] else surf[i]
            at_start = at_start and not s
            out.append(s)
        return "".join(out)

    ids = np.flatnonzero(plain).tolist()
    x = next((i for i in ids if normal[i] and lead[i] == 0), None)
    y = next((i for i in ids if lead[i] == 1), None)
    ws = [i for i in ids if lead[i] == 2][:1]
    if x is None or y is None:
        return None
    probes = [[i] for i in ids] + [[x, i] for i in ids] + [[*ws, i] for i in ids] + \
             [[*ws, *ws, i] for i in ids] + [[i, y] for i in ids] + [[*ws, i, y] for i in ids]
    if sp.decode(probes) != [rule(p) for p in probes]:
        return None
    blob = [s.encode("utf-8") for s in surf]
    nbytes = np.array([len(b) for b in blob], np.int64)
    return np.frombuffer(b"".join(blob), np.uint8), np.cumsum(nbytes) - nbytes, nbytes, plain, lead


def shard_window_texts(tokens: np.ndarray, offsets: np.ndarray, max_seq_len: int, enc,
                       fast: bool = True) -> list[str]:
    """window_texts of the windows tokens[o:o+max_seq_len+1] of one shard, equal string for
    string (tests/test_data.py checks it on real data), without a decode per window: the
    pieces between BOS tokens are cut with numpy over the whole shard; a piece of plain
    tokens is a slice of the shard's text bytes (every token's surface laid end to end
    once, see _surface_table); the others (byte fallback, unknown) go to one batched
    sentencepiece decode, as window_texts does for all (fast=False: all of them)."""
    tokens = np.asarray(tokens)
    offsets = np.asarray(offsets, dtype=np.int64)
    L, n = max_seq_len + 1, len(offsets)
    if n == 0:
        return []
    lo, hi = int(offsets.min()), int(offsets.max()) + L
    tok = tokens[lo:hi].astype(np.int64)  # the span the windows cover; positions below are relative to lo
    offsets = offsets - lo
    bos = np.flatnonzero(tok == BOS_ID)
    k0 = np.searchsorted(bos, offsets, "left")          # first BOS inside window i
    nb = np.searchsorted(bos, offsets + L, "left") - k0  # BOS tokens inside it
    cnt = nb + 1                                         # pieces of window i (some empty)
    first = np.zeros(n + 1, np.int64)
    np.cumsum(cnt, out=first[1:])
    win = np.repeat(np.arange(n), cnt)                   # window of each piece
    j = np.arange(int(first[-1])) - first[:-1][win]      # piece number inside its window
    kb = k0[win] + j                                     # the BOS ending piece j (if j < nb)
    start = np.where(j == 0, offsets[win], bos[np.maximum(kb - 1, 0)] + 1 if len(bos) else 0)
    end = np.where(j == nb[win], offsets[win] + L, bos[np.minimum(kb, max(len(bos) - 1, 0))] if len(bos) else 0)
    end = np.minimum(end, len(tok))                      # a window cut by the end of the shard
    keep = end > start
    win, start, end = win[keep], start[keep], end[keep]
    in_range = tok.size and 0 <= int(tok.min()) and int(tok.max()) < enc.sp.vocab_size()
    table = _surface_table(enc.sp) if fast and in_range else None
    out = [None] * len(win)
    if table is not None:
        blob, boff, nbytes, plain, lead = table
        nb_tok = nbytes[tok]
        cb = np.zeros(tok.size + 1, np.int64)
        np.cumsum(nb_tok, out=cb[1:])                    # byte offset of every token
        text = blob[np.repeat(boff[tok] - cb[:-1], nb_tok) + np.arange(cb[-1])].tobytes()
        odd = np.zeros(tok.size + 1, np.int64)
        np.cumsum(~plain[tok], out=odd[1:])
        slow = (odd[end] - odd[start]) > 0
        fast_k = np.flatnonzero(~slow)
        cut = lead[tok[start[fast_k]]]                   # leading '▁' dropped (see _surface_table)
        for k, a, b, c in zip(fast_k.tolist(), cb[start[fast_k]].tolist(), cb[end[fast_k]].tolist(), cut.tolist()):
            if c == 2:  # '▁' pieces first (rare): drop them and one '▁' of the next piece
                p = int(start[k])
                while p < end[k] and lead[tok[p]] == 2:
                    p += 1
                c = p - int(start[k]) + (p < end[k] and lead[tok[p]] == 1)
            out[k] = text[a:b].decode("utf-8")[c:]
        todo = np.flatnonzero(slow).tolist()
    else:
        todo = list(range(len(win)))
    if todo:
        st, en = start.tolist(), end.tolist()
        for k, t in zip(todo, enc.sp.decode([tok[st[k]:en[k]].tolist() for k in todo])):
            out[k] = t
    texts = [[] for _ in range(n)]
    for i, t in zip(win.tolist(), out):
        if t:
            texts[i].append(t)
    return ["\n".join(t) for t in texts]


def token_stamps(data_dir, vocab_size) -> DoneRecord:
    """pretokenize's 'already computed' record (data/tok{V}/stamps.json): per raw shard
    name, the key "raw_sha256:tokenizer_sha256" its .bin was made from. Batch metrics
    key their per-shard cache on the same string."""
    return DoneRecord(tok_dir(data_dir, vocab_size) / "stamps.json", {"stage": "pretokenize", "format": 1})

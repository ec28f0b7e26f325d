"""
TinyStories data: download, offline sample, tokenizer training, pretokenization into
llama2.c's .bin shards plus the batch index, batch metrics, and the batch reader.

$ python tinystories.py download                       # ~1.5 GB archive -> data/TinyStories_all_data/
$ python tinystories.py sample                         # offline: ~4,000 generated stories in 5 shards
$ python tinystories.py sample --noise=0.2 --data_dir=data_noisy   # 20% of training stories corrupted
$ python tinystories.py train_vocab --vocab_size=512   # -> data/tok512.model
$ python tinystories.py pretokenize --vocab_size=512   # -> data/tok512/*.bin, batch index, out/tables/batch_metrics.csv
$ python tinystories.py pretokenize --vocab_size=0 --tokenizer=path/to/llama2/tokenizer.model
                                  # llama2.c's Llama 2 vocabulary: the shards beside the JSON, then --vocab_size=32000
$ python tinystories.py pretokenize --holdout=0.2      # hold out 20% of the training batches (default 10%)

A *batch* (llama2.c's word) is one window of max_seq_len+1 tokens at offset
i*max_seq_len of one shard. Batches are numbered in shard order, shard 0 first; shard 0
is the validation split (llama2.c's rule). The batch index maps every batch_id back
to its shard, offset and the stories it overlaps. pretokenize also marks a seeded
holdout of whole training batches (holdout.npy beside the index; no id changes): the
reference scorer is fitted on it, and runs whose selection, pruning or schedule reads
that reference never train on it (RHO-LOSS's holdout split).
"""

import argparse
import gzip
import itertools
import json
import os
import random
import shutil
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from prebias import batchmetrics
from prebias.common import (SEED, UserError, atomic_path, main_guard, remove_stale_temps, write_json_atomic,
                            write_text_atomic)
from prebias.data import (BOS_ID, DATA_DIR, HOLDOUT_FRACTION, LLAMA2_RECORD, LLAMA2_TOKENIZER, MAX_SEQ_LEN, RAW_NAME,
                          SAMPLE, VOCAB_SIZE, load_stories, raw_dir, raw_shards, sha256_file, tok_dir, token_stamps,
                          write_holdout, write_index)
from prebias.inputs import read_json
from prebias.storygen import corrupt, generate_stories, noise_plan
from tokenizer import Tokenizer, tokenizer_model_path

# -----------------------------------------------------------------------------
# config
DATA_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
MIN_VOCAB = 259  # 256 byte-fallback pieces + <unk>, <s>, </s>
DOWNLOAD_RECORD = "DOWNLOAD.json"  # beside the extracted shards: the archive's and each shard's size and sha256
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# download: resumable (HTTP Range), atomic, safe extraction

def _range_start(resp) -> int | None:
    """The first byte of a 206 response (its Content-Range), None when it has none."""
    cr = resp.headers.get("content-range", "")
    try:
        return int(cr.split()[1].split("-")[0]) if cr.startswith("bytes ") else None
    except (IndexError, ValueError):
        return None


def download_file(url: str, dest: Path, chunk_size=1 << 16, timeout=30):
    """Download url to dest. Bytes arrive in dest.part; a second call resumes from
    its size with a Range request (a 206 must start exactly there). dest appears only
    when complete."""
    import requests
    from tqdm import tqdm
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = requests.get(url, stream=True, headers=headers, timeout=timeout)
    except requests.exceptions.RequestException as e:
        raise UserError(f"cannot reach {url} ({type(e).__name__}); offline? "
                        "use python tinystories.py sample for the bundled offline data") from None
    with resp:
        if resp.status_code == 416:  # asked past the end: the .part is already complete
            os.replace(part, dest)
            return dest
        if resp.status_code not in (200, 206):
            raise UserError(f"download of {url} failed: HTTP {resp.status_code}")
        if resp.status_code == 200:  # server ignored Range: start over
            have = 0
        elif _range_start(resp) != have:  # bytes from elsewhere would be glued onto the .part
            part.unlink(missing_ok=True)
            raise UserError(f"download of {url}: asked for bytes from {have} but the server sent a range starting at "
                            f"{_range_start(resp)}; the partial file was removed: run the same command again")
        total = int(resp.headers.get("content-length", 0)) + have
        with open(part, "ab" if have else "wb") as f, tqdm(
                desc=dest.name, total=total or None, initial=have, unit="iB",
                unit_scale=True, unit_divisor=1024) as bar:
            try:
                for data in resp.iter_content(chunk_size=chunk_size):
                    bar.update(f.write(data))
            except requests.exceptions.RequestException:
                pass  # connection cut: what arrived stays in .part, checked below
    if total and part.stat().st_size != total:
        raise UserError(f"download of {url} stopped at {part.stat().st_size}/{total} bytes: "
                        "run the same command again to resume")
    os.replace(part, dest)
    return dest


def extract_archive(archive: Path, target: Path):
    """Extract a .tar.gz into target atomically: into a temp folder first, refusing
    members that would land outside it (links, absolute paths, '..'). On any failure
    the temp folder and the archive go, so a rerun starts clean."""
    tmp = target.with_name(target.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with gzip.open(archive) as g:  # the whole stream first: its CRC32 catches damage tarfile would not read
            while g.read(1 << 22):
                pass
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")  # 'data' filter rejects escaping paths
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:  # a corrupt gzip stream: zlib.error
        shutil.rmtree(tmp, ignore_errors=True)
        archive.unlink(missing_ok=True)
        raise UserError(f"archive {archive} is corrupt or unsafe ({type(e).__name__}: {e}); it was removed: "
                        "run python tinystories.py download again") from None
    shards = sorted(p for p in tmp.glob("data*.json") if p.is_file() and not p.is_symlink())
    if not shards:
        shutil.rmtree(tmp)
        archive.unlink(missing_ok=True)
        raise UserError(f"archive {archive} holds no data*.json shards (it was removed); check --url")
    write_json_atomic(tmp / DOWNLOAD_RECORD, {
        "archive": {"name": archive.name, "size": archive.stat().st_size, "sha256": sha256_file(archive)},
        "shards": {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in shards}})
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def check_download(target: Path):
    """The downloaded shards against the record made when they were extracted: a shard
    changed, added or removed since is one line, never silently trained on."""
    rec = read_json(target / DOWNLOAD_RECORD, "the download record", f"delete {target} and run python "
                    "tinystories.py download again", keys=("shards",))
    have = {p.name for p in target.glob("data*.json")}
    if have != set(rec["shards"]):
        extra, gone = sorted(have - set(rec["shards"])), sorted(set(rec["shards"]) - have)
        raise UserError(f"{target}: {'unknown shard ' + extra[0] if extra else 'shard ' + gone[0] + ' is missing'} "
                        f"since the download: delete {target} and run python tinystories.py download again")
    for name, want in rec["shards"].items():
        p = target / name
        if p.is_symlink() or not p.is_file() or p.stat().st_size != want["size"] or sha256_file(p) != want["sha256"]:
            raise UserError(f"{p} changed since the download (its size or sha256 differs from {DOWNLOAD_RECORD}): "
                            f"delete {target} and run python tinystories.py download again")


def download(data_dir=DATA_DIR, url=DATA_URL):
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    target = raw_dir(data_dir)
    if list(target.glob("data*.json")) and not (target / SAMPLE).exists():
        if (target / DOWNLOAD_RECORD).exists():
            check_download(target)
            print(f"{target} already holds the dataset (shards checked against {DOWNLOAD_RECORD}), skipping download")
        else:
            print(f"{target} already holds the dataset (placed there by hand: no {DOWNLOAD_RECORD} to check it "
                  "against), skipping download")
        return target
    archive = data_dir / f"{RAW_NAME}.tar.gz"
    if not archive.exists():
        download_file(url, archive)
    extract_archive(archive, target)
    print(f"Number of shards: {len(raw_shards(data_dir))}, in {target}")
    return target


def sample(data_dir=DATA_DIR, n_stories=4000, n_shards=5, seed=SEED, noise=0.0):
    """Write generated stories (storygen.py) in TinyStories' JSON format, so that the
    whole pipeline runs offline. A SAMPLE marker keeps it from overwriting real data.
    noise > 0 replaces that (seeded) fraction of the training stories (shards 1..; the
    validation shard 0 stays clean) by corrupted text (storygen.corrupt), each row saying
    its corruption in a "noise" field: a test bed for batch selection."""
    if n_shards < 2 or n_stories < n_shards:
        raise UserError(f"--n_stories={n_stories} --n_shards={n_shards}: need at least 2 shards (shard 0 is "
                        "validation) and a story per shard")
    if not 0 <= noise < 1:
        raise UserError(f"--noise={noise}: a fraction in [0, 1)")
    target = raw_dir(data_dir)
    if list(target.glob("data*.json")) and not (target / SAMPLE).exists():
        raise UserError(f"{target} holds downloaded data; sample would overwrite it. "
                        "Use --data_dir=<another folder> for the sample")
    stories = generate_stories(n_stories, seed=seed)
    chunks = np.array_split(np.arange(n_stories), n_shards)
    stories, kinds = corrupt_stories(stories, len(chunks[0]), noise, seed)
    target.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target, r"data\d+\.json|" + SAMPLE)  # of a sample killed while saving
    write_text_atomic(target / SAMPLE, json.dumps({"complete": False}) + "\n")  # readers refuse a partial set
    for old in target.glob("data*.json"):
        old.unlink()
    for i, chunk in enumerate(chunks):
        rows = [{"story": stories[j], "instruction": {"prompt:": "", "words": [], "features": []},
                 "summary": "", "source": "llama2_prebiasing.storygen", **({"noise": kinds[j]} if noise else {})}
                for j in chunk]
        with atomic_path(target / f"data{i:02d}.json") as tmp:
            tmp.write_text(json.dumps(rows, ensure_ascii=False))
    write_text_atomic(target / SAMPLE, json.dumps({"n_stories": n_stories, "seed": seed, "noise": noise,
                                                   "complete": True, "shards": [f"data{i:02d}.json" for i in
                                                                                range(len(chunks))]}) + "\n")
    print(f"wrote {n_stories} stories in {n_shards} shards to {target}"
          + (f" ({sum(k is not None for k in kinds)} training stories corrupted)" if noise else ""))
    return target


def corrupt_stories(stories: list[str], n_val: int, noise: float, seed: int) -> tuple[list[str], list]:
    """(stories, kinds): the planted noise of `sample --noise` (storygen.noise_plan and
    corrupt) applied to the stories after the first n_val (the validation shard stays
    clean); kinds[i] is story i's corruption or None. Any stories, generated or real."""
    stories, kinds = list(stories), [None] * len(stories)
    plan = noise_plan(len(stories) - n_val, noise, seed) if noise else {}
    rng = random.Random(f"corrupt:{seed}")
    for i, kind in plan.items():  # in index order, so the draws are reproducible
        kinds[n_val + i] = kind
        stories[n_val + i] = corrupt(stories[n_val + i], kind, rng)
    return stories, kinds


def noisy_copy(src_dir, dst_dir, noise: float, seed: int = SEED) -> Path:
    """A copy of src_dir's raw shards (real or generated) in dst_dir with the planted noise
    of `sample --noise` (corrupt_stories) in the training shards: every row gains the
    "noise" field that batch metrics' noisy column reads. Real stories as a noisy test bed."""
    shards = raw_shards(src_dir)
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in shards]
    stories, kinds = corrupt_stories([r["story"] for rs in rows for r in rs], len(rows[0]), noise, seed)
    target = raw_dir(dst_dir)
    target.mkdir(parents=True, exist_ok=True)
    k = 0
    for p, rs in zip(shards, rows):
        out = []
        for r in rs:
            out.append({**r, "story": stories[k], "noise": kinds[k]})
            k += 1
        with atomic_path(target / p.name) as tmp:
            tmp.write_text(json.dumps(out, ensure_ascii=False))
    print(f"wrote {k} stories to {target} ({sum(x is not None for x in kinds)} training stories corrupted)")
    return target


# -----------------------------------------------------------------------------
# tokenizer training

def train_vocab(vocab_size: int, data_dir=DATA_DIR, num_shards=10):
    """Sentencepiece BPE as llama2.c trains it (byte fallback, identity normalisation)
    on the training shards (1..num_shards; shard 0 is kept unseen for validation)."""
    import sentencepiece as spm

    # byte fallback needs 256 byte pieces + <unk>, <s>, </s>: fewer cannot be trained
    if vocab_size < MIN_VOCAB or vocab_size > 65535:
        raise UserError(f"--vocab_size={vocab_size}: give {MIN_VOCAB}..65535 (byte fallback needs "
                        f"{MIN_VOCAB - 3} pieces more than the 3 specials; uint16 shards hold at most 65535)")
    shards = raw_shards(data_dir)
    train = shards[1:num_shards + 1] or shards
    prefix = Path(data_dir) / f"tok{vocab_size}"
    text_file = Path(data_dir) / f"tok{vocab_size}.txt"
    try:  # the training text is a temp file: never left behind, even by a failed training
        with open(text_file, "w", encoding="utf-8") as f:
            for shard in train:
                for story in load_stories(shard):
                    f.write(story + "\n")
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=str(prefix), model_type="bpe",
            vocab_size=vocab_size, input_format="text",
            character_coverage=1.0, num_threads=os.cpu_count(), split_digits=True,
            allow_whitespace_only_pieces=True, byte_fallback=True,
            unk_surface=r" \342\201\207 ", normalization_rule_name="identity",
            shuffle_input_sentence=False, minloglevel=2)
    except RuntimeError as e:  # e.g. a vocab larger than the text allows
        raise UserError(f"train_vocab --vocab_size={vocab_size} failed on {raw_dir(data_dir)}: "
                        f"{str(e).splitlines()[0]} (change --vocab_size as sentencepiece says)") from None
    finally:
        text_file.unlink(missing_ok=True)
    print(f"wrote {prefix}.model (copy it to tokenizer.model to make it the default)")
    return prefix.with_suffix(".model")


# -----------------------------------------------------------------------------
# pretokenize: .bin shards (uint16, BOS before each story) + batch index

def _tokenize_shard(args):
    shard, out_path, model_path = args
    enc = Tokenizer(model_path)
    ids = enc.encode_batch(load_stories(shard))
    arr = np.fromiter(itertools.chain.from_iterable([BOS_ID, *t] for t in ids), dtype=np.uint16)
    with atomic_path(out_path) as tmp:
        arr.tofile(tmp)
    return shard


def use_llama2_tokenizer(data_dir, tokenizer: str = "") -> int:
    """pretokenize --vocab_size=0 (llama2.c's vocab_source=llama2): the Llama 2 sentencepiece
    model is the user's file (this project ships none and downloads none): --tokenizer=path,
    else the one an earlier --vocab_size=0 copied beside the JSON, else tokenizer.model in the
    working folder as llama2.c documents, when it has Llama 2's 32,000 pieces. It is copied
    beside the JSON shards (and recorded) so that every later stage finds it by its vocab
    size. Returns that vocab size."""
    raw = raw_dir(data_dir)
    recorded = not tokenizer and (raw / LLAMA2_RECORD).exists()
    src = Path(tokenizer) if tokenizer else raw / LLAMA2_TOKENIZER if recorded else Path(LLAMA2_TOKENIZER)
    if not src.is_file():
        raise UserError(f"--vocab_size=0 tokenizes with a Llama 2 sentencepiece model and {src} is not there: pass "
                        "--tokenizer=path/to/tokenizer.model (Meta's, as llama2.c uses; this project ships none)")
    enc = Tokenizer(src)
    if enc.vocab_size > 65536:
        raise UserError(f"{src} has {enc.vocab_size} pieces: uint16 shards hold at most 65,536")
    if not tokenizer and not recorded and enc.vocab_size != 32000:
        raise UserError(f"{src} has {enc.vocab_size} pieces, not Llama 2's 32,000 (here tokenizer.model is the "
                        "project's own default): pass --tokenizer=path to use it, or the Llama 2 one")
    custom = Path(data_dir) / f"tok{enc.vocab_size}"
    if custom.exists() or custom.with_suffix(".model").exists():
        raise UserError(f"{custom} already holds a custom {enc.vocab_size}-piece vocabulary: use another --data_dir "
                        "for the Llama 2 one")
    if recorded:
        return enc.vocab_size
    raw.mkdir(parents=True, exist_ok=True)
    dst, sha = raw / LLAMA2_TOKENIZER, sha256_file(src)
    if not dst.exists() or sha256_file(dst) != sha:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    write_json_atomic(raw / LLAMA2_RECORD, {"vocab_size": enc.vocab_size, "source": str(src.resolve()),
                                            "sha256": sha})
    return enc.vocab_size


BIN_HASHES = "bins.json"  # data/tok{V}/: sha256 of each .bin shard as pretokenize wrote it


def bin_hashes(out: Path) -> dict:
    p = out / BIN_HASHES
    try:
        got = json.loads(p.read_text()) if p.exists() else {}
    except ValueError:
        got = {}  # a damaged record: every shard is re-tokenized
    return got if isinstance(got, dict) else {}


def shard_hashes(shards: list[Path]) -> dict:
    """{shard name: sha256}, refusing two raw shards with the same bytes: a copy of the
    validation shard (data00) would be trained on as new data and scored as unseen, a copy
    of a training shard trained twice."""
    seen, out = {}, {}
    for p in shards:
        h = out[p.name] = sha256_file(p)
        if h in seen:
            raise UserError(f"raw shards {seen[h]} and {p} hold the same bytes (sha256 {h[:12]}): a copy would be "
                            f"trained on as new data; remove {p.name} (or rerun python tinystories.py download / "
                            "sample into a fresh --data_dir)")
        seen[h] = p
    return out


def pretokenize(vocab_size=VOCAB_SIZE, max_seq_len=MAX_SEQ_LEN, data_dir=DATA_DIR,
                workers=None, tables_dir=None, metrics="all", ref_model="", tokenizer="",
                holdout=HOLDOUT_FRACTION):
    from tqdm import tqdm
    if max_seq_len < 1 or (workers is not None and workers < 1):
        raise UserError(f"--max_seq_len={max_seq_len} --workers={workers}: both must be at least 1")
    if not 0 <= holdout < 1:
        raise UserError(f"--holdout={holdout}: a fraction of the training batches in [0, 1)")
    shards = raw_shards(data_dir)
    if vocab_size == 0:  # from here on the data answers for its tokenizer's vocab size (tok_dir)
        vocab_size = use_llama2_tokenizer(data_dir, tokenizer)
        print(f"Llama 2 vocabulary ({vocab_size} pieces): shards beside the JSON in {raw_dir(data_dir)}; "
              f"train with --vocab_size={vocab_size}")
    elif tokenizer:
        raise UserError("--tokenizer is for --vocab_size=0 (a Llama 2 model); a custom vocabulary uses "
                        f"{Path(data_dir) / f'tok{vocab_size}.model'} from train_vocab")
    model_path = tokenizer_model_path(vocab_size, data_dir)
    tok_sha = sha256_file(model_path)
    if metrics not in (None, "", "none"):  # a bad request is refused before anything is rewritten
        batchmetrics.check_request(metrics, ref_model, vocab_size, max_seq_len, tok_sha)
    out = tok_dir(data_dir, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    # 1) tokens: skip shards whose json and tokenizer are unchanged since the last run
    done = token_stamps(data_dir, vocab_size)
    bins = bin_hashes(out)  # what each .bin held when written: a skipped one is checked, not trusted
    jobs, keys, raw_sha = [], {}, shard_hashes(shards)
    for shard in shards:
        bin_path = out / shard.with_suffix(".bin").name
        keys[shard.name] = f"{raw_sha[shard.name]}:{tok_sha}"
        if not (done.is_done(shard.name, keys[shard.name], bin_path) and bin_path.is_file()
                and bins.get(bin_path.name) == sha256_file(bin_path)):
            jobs.append((shard, bin_path, model_path))
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        for shard in tqdm(pool.map(_tokenize_shard, jobs), total=len(jobs), desc="tokenize", disable=not jobs):
            bins[shard.with_suffix(".bin").name] = sha256_file(out / shard.with_suffix(".bin").name)
            write_json_atomic(out / BIN_HASHES, bins)
            done.mark(shard.name, keys[shard.name], save=True)  # progress survives an interruption
    done.save(keep=keys)  # forget shards whose raw json is gone ...
    for stale in set(out.glob("data*.bin")) - {out / s.with_suffix(".bin").name for s in shards}:
        stale.unlink()  # ... and their tokens
    # 2) batch index over all shards, shard 0 (validation) first, and the holdout marked in it
    idir = write_index(data_dir, vocab_size, max_seq_len, model_path.name, tok_sha)
    write_holdout(data_dir, vocab_size, max_seq_len, holdout)
    if metrics not in (None, "", "none"):
        batchmetrics.write_batch_metrics(data_dir, vocab_size, max_seq_len, tables_dir, metrics, workers,
                                         ref_model)
    return idir


# -----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["download", "sample", "train_vocab", "pretokenize"])
    ap.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--max_seq_len", type=int, default=MAX_SEQ_LEN)
    ap.add_argument("--data_dir", default=str(DATA_DIR))
    ap.add_argument("--url", default=DATA_URL, help="download: archive address")
    ap.add_argument("--n_stories", type=int, default=4000, help="sample: number of stories")
    ap.add_argument("--n_shards", type=int, default=5, help="sample: number of shards")
    ap.add_argument("--seed", type=int, default=SEED, help="sample: generator seed")
    ap.add_argument("--noise", type=float, default=0.0, help="sample: fraction of training stories corrupted")
    ap.add_argument("--workers", type=int, default=None, help="pretokenize: processes (default: all cores)")
    ap.add_argument("--metrics", default="all", help="pretokenize: comma list of batch metrics, 'all' or 'none'")
    ap.add_argument("--tables_dir", default=None, help="pretokenize: where batch_metrics.csv goes (default out/tables)")
    ap.add_argument("--ref_model", default="", help="pretokenize: model.bin or ckpt .pt as reference scorer "
                    "(default: a 3-gram model of the holdout)")
    ap.add_argument("--tokenizer", default="", help="pretokenize --vocab_size=0: the Llama 2 sentencepiece model "
                    "(default: tokenizer.model, as llama2.c)")
    ap.add_argument("--holdout", type=float, default=HOLDOUT_FRACTION,
                    help="pretokenize: share of the training batches held out for the reference scorer")
    a = ap.parse_args()
    if a.stage == "download":
        download(a.data_dir, a.url)
    elif a.stage == "sample":
        sample(a.data_dir, a.n_stories, a.n_shards, a.seed, a.noise)
    elif a.stage == "train_vocab":
        train_vocab(a.vocab_size, a.data_dir)
    elif a.stage == "pretokenize":
        pretokenize(a.vocab_size, a.max_seq_len, a.data_dir, a.workers, a.tables_dir, a.metrics, a.ref_model,
                    a.tokenizer, a.holdout)


if __name__ == "__main__":
    main_guard(main)

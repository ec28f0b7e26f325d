"""Fuzz every file format a stage reads: truncated, bytes flipped, keys dropped, values of
the wrong type, NaN, huge values, a symbolic link or a folder in its place. A reader may
accept a file that is still valid, or refuse it with one UserError line naming the file;
anything else (a traceback from json, numpy, torch or pandas) is a failure, and nothing
may be written outside the folder the stage owns."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import experiment
import report
import tinystories
from prebias import batchmetrics, checkpoint, schedule, tags
from prebias.common import UserError
from prebias.data import BatchData
from tokenizer import Tokenizer

WRONG = [None, "x", [], {}, -1, 2 ** 63, 1e308, math.nan, True]


def json_mutations(obj, depth=2):
    """(label, mutated object): every key dropped and every value replaced by each wrong
    one, down to `depth` levels of objects (lists: their first element)."""
    def walk(o, path, d):
        if isinstance(o, dict):
            for k in list(o):
                yield path + [k]
                if d > 0:
                    yield from walk(o[k], path + [k], d - 1)
        elif isinstance(o, list) and o and d > 0:
            yield path + [0]
            yield from walk(o[0], path + [0], d - 1)

    def setp(root, path, value, drop=False):
        root = json.loads(json.dumps(root))
        o = root
        for k in path[:-1]:
            o = o[k]
        if drop and isinstance(o, dict):
            del o[path[-1]]
        elif not drop:
            o[path[-1]] = value
        return root
    for path in walk(obj, [], depth):
        if isinstance(path[-1], str):
            yield f"drop {path}", setp(obj, path, None, drop=True)
        for w in WRONG:
            yield f"{path} = {w!r}", setp(obj, path, w)


def byte_mutations(data: bytes, seed=0):
    """(label, bytes): truncations and flipped bytes."""
    rng = np.random.default_rng(seed)
    for cut in sorted({0, 1, 7, len(data) // 3, len(data) // 2, len(data) - 1}):
        if 0 <= cut < len(data):
            yield f"truncated at {cut}", data[:cut]
    for k in range(4):
        b = bytearray(data)
        for i in rng.integers(0, len(b), 1 + k * 3):
            b[i] ^= 0xFF
        yield f"{1 + k * 3} bytes flipped", bytes(b)


def place_mutations(path):
    """Replace a file by a folder, or by a symbolic link to another file."""
    yield "a folder", lambda: (path.unlink(), path.mkdir())
    other = path.with_name("other_" + path.name)
    yield "a symlink", lambda: (shutil.copy(path, other), path.unlink(), path.symlink_to(other))


def only_user_errors(read, label):
    try:
        read()
    except UserError as e:
        assert "\n" not in str(e), (label, str(e))
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{label}: {type(e).__name__}: {e}")


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -----------------------------------------------------------------------------

def test_fuzz_the_tag_file(tmp_path):
    enc = Tokenizer()
    base = {"seed": 3, "tags": [
        {"id": "secret", "kind": "canary", "text": "the secret number is {digits:6}", "rows": 2,
         "steps": {"start": 10, "end": 40, "every": 4}},
        {"id": "happy", "kind": "conditional", "text": "<happy>", "metric": "sentiment", "lo": 0.5, "hi": None,
         "steps": {"start": 0, "end": 30}}]}
    p = tmp_path / "tags.json"
    cases = list(json_mutations(base, depth=3)) + [("huge rows", {**base, "tags": [{**base["tags"][0], "rows": 10 ** 9}]})]
    for label, obj in cases:
        p.write_text(json.dumps(obj))
        only_user_errors(lambda: tags.load_tags(p, enc, 64, 512).check_run(8, 100), f"tag file, {label}")
    raw = json.dumps(base).encode()
    for label, b in byte_mutations(raw):
        p.write_bytes(b)
        only_user_errors(lambda: tags.load_tags(p, enc, 64, 512), f"tag file, {label}")
    for label, act in place_mutations(p):
        p.write_bytes(raw)
        act()
        only_user_errors(lambda: tags.load_tags(p, enc, 64, 512), f"tag file, {label}")
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def test_fuzz_the_schedule_spec(tmp_path):
    ids = np.arange(100, 400)
    base = {"phases": [{"strategy": "competence", "metric": "m", "c0": 0.2, "fraction": 0.5},
                       {"strategy": "mixture", "metric": "m", "quantiles": [0, 0.5, 1], "weights": [1, 2], "steps": 10},
                       {"strategy": "interleave", "orders": [{"strategy": "shuffle"},
                                                             {"strategy": "sorted", "metric": "m"}], "ratio": [2, 1]}]}
    for label, obj in list(json_mutations(base, depth=4)) + [("huge steps", {"phases": [{"strategy": "shuffle",
                                                                                            "steps": 10 ** 15}]})]:
        def read():
            s = schedule.Schedule(obj, ids, 4, seed=1, max_iters=50, metric_of=lambda m: np.linspace(0, 1, len(ids)))
            s.step_ids(0), s.step_ids(49)
        only_user_errors(lambda: _spec_error_as_user(read), f"spec, {label}")


def _spec_error_as_user(fn):
    try:
        fn()
    except schedule.SpecError as e:  # the stream turns it into the one-line UserError
        raise UserError(str(e)) from None


def test_fuzz_the_batch_index_and_bin_shards(tiny_data, tmp_path):
    src = tiny_data[0] / "tok512"
    meta = json.loads((src / "index_T64" / "meta.json").read_text())
    d = tmp_path / "tok512"

    def fresh():
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d, symlinks=True)
    for label, obj in json_mutations(meta, depth=3):
        fresh()
        (d / "index_T64" / "meta.json").write_text(json.dumps(obj))
        only_user_errors(lambda: BatchData(tmp_path, 512, 64).get(np.array([0, 5])), f"meta.json, {label}")
    for name in ("index_T64/batches.npy", "data01.bin"):
        raw = (src / name).read_bytes()
        for label, b in byte_mutations(raw):
            fresh()
            (d / name).write_bytes(b)
            only_user_errors(lambda: BatchData(tmp_path, 512, 64).get(np.array([0, 5])), f"{name}, {label}")
        for label, act in place_mutations(d / name):
            fresh()
            act()
            only_user_errors(lambda: BatchData(tmp_path, 512, 64), f"{name}, {label}")


def test_fuzz_the_batch_metrics(tiny_data, tmp_path):
    data = BatchData(tiny_data[0], 512, 64)
    src = tiny_data[1]
    meta = json.loads((src / "batch_metrics.json").read_text())
    t = tmp_path / "t"

    def fresh():
        shutil.rmtree(t, ignore_errors=True)
        shutil.copytree(src, t)
    for label, obj in json_mutations(meta, depth=1):
        fresh()
        (t / "batch_metrics.json").write_text(json.dumps(obj))
        only_user_errors(lambda: batchmetrics.load_batch_metrics(t, data), f"batch_metrics.json, {label}")
    raw = (src / "batch_metrics.csv").read_bytes()
    lines = raw.split(b"\n")
    csv_cases = list(byte_mutations(raw)) + [
        ("a NaN batch_id", b"\n".join([lines[0], lines[1].replace(b"0,", b"nan,", 1)] + lines[2:])),
        ("a huge value", b"\n".join([lines[0], lines[1] + b"9" * 400] + lines[2:])),
        ("a row missing", b"\n".join(lines[:5] + lines[6:])), ("no header", b"\n".join(lines[1:]))]
    for label, b in csv_cases:
        fresh()
        (t / "batch_metrics.csv").write_bytes(b)
        only_user_errors(lambda: batchmetrics.load_metric_column(t, "fk_grade", data), f"batch_metrics.csv, {label}")


def test_fuzz_checkpoints_and_optimizer_files(tiny_run, tmp_path):
    run = tmp_path / "run"

    def fresh():
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(tiny_run.out_dir, run)

    def read():
        for it, p in checkpoint.run_checkpoints(run):
            checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(p))
        checkpoint.stream_records(run)
    raw = (tiny_run.out_dir / "ckpt" / "ckpt_8.pt").read_bytes()
    for label, b in byte_mutations(raw):
        fresh()
        (run / "ckpt" / "ckpt_8.pt").write_bytes(b)
        only_user_errors(read, f"ckpt_8.pt, {label}")
    good = torch.load(tiny_run.out_dir / "ckpt" / "ckpt_8.pt", weights_only=True)
    for label, ck in [("drop config", {k: v for k, v in good.items() if k != "config"}),
                      ("drop batch_ids", {k: v for k, v in good.items() if k != "batch_ids"}),
                      ("config a list", {**good, "config": [1]}), ("model a string", {**good, "model": "x"}),
                      ("prev_iter huge", {**good, "prev_iter": 10 ** 12}), ("not a dict", [1, 2])]:
        fresh()
        torch.save(ck, run / "ckpt" / "ckpt_8.pt")
        only_user_errors(read, f"ckpt_8.pt, {label}")
    for label, act in place_mutations(run / "ckpt" / "ckpt_8.pt"):
        fresh()
        act()
        only_user_errors(read, f"ckpt_8.pt, {label}")


def test_fuzz_the_experiment_spec(tiny_data, tmp_path):
    base = {"question": "q", "base": {"dim": 32, "max_iters": 10}, "arms": {"a": {}, "b": {"schedule": "sorted"}},
            "baseline": "a", "seeds": [1, 2], "eval": {"n_prompts": 2}, "durability": {"R": 10},
            "metrics": ["val_loss"], "primary": ["val_loss"], "test": "auto"}
    p = tmp_path / "spec.json"
    before = listing(tmp_path)
    for label, obj in json_mutations(base, depth=2):
        p.write_text(json.dumps(obj))
        only_user_errors(lambda: experiment.load_spec(p), f"experiment spec, {label}")
    for label, b in byte_mutations(json.dumps(base).encode()):
        p.write_bytes(b)
        only_user_errors(lambda: experiment.load_spec(p), f"experiment spec, {label}")
    assert listing(tmp_path) == before + ([] if "spec.json" in before else ["spec.json"])


def test_fuzz_the_report_inputs(tmp_path):
    from test_bad_input import _evil_experiment
    src = tmp_path / "src"
    _evil_experiment(src)
    spec = json.loads((src / "experiment.json").read_text())
    d = tmp_path / "exp"
    for label, obj in json_mutations(spec, depth=1):
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        (d / "experiment.json").write_text(json.dumps(obj))
        only_user_errors(lambda: report.main([str(d)]), f"experiment.json, {label}")
    for f in ("final.csv", "differences.csv", "saturation.csv"):
        raw = (src / "tables" / f).read_bytes()
        for label, b in byte_mutations(raw):
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(src, d)
            (d / "tables" / f).write_bytes(b)
            only_user_errors(lambda: report.main([str(d)]), f"{f}, {label}")
    assert set(os.listdir(tmp_path)) == {"src", "exp"}  # nothing written beside the experiment


def test_fuzz_the_raw_shards(tiny_data, tmp_path):
    raw = (tiny_data[0] / "TinyStories_all_data" / "data01.json").read_bytes()
    d = tmp_path / "d"

    def fresh():
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(tiny_data[0] / "TinyStories_all_data", d / "TinyStories_all_data")
        shutil.copy(tiny_data[0] / "tok512.model", d)
    shard = d / "TinyStories_all_data" / "data01.json"
    stories = json.loads(raw)[:3]
    cases = list(byte_mutations(raw))[:6] + [(label, json.dumps(obj).encode())
                                             for label, obj in json_mutations(stories, depth=2)][:20]
    for label, b in cases:
        fresh()
        shard.write_bytes(b)
        only_user_errors(lambda: tinystories.pretokenize(512, 64, d, workers=1, metrics="none"), f"raw shard, {label}")
    for label, act in place_mutations(shard):
        fresh()
        act()
        only_user_errors(lambda: tinystories.pretokenize(512, 64, d, workers=1, metrics="none"), f"raw shard, {label}")

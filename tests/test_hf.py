"""The Hugging Face folder both ways (prebias/hf.py, export.py --version=hf / --from_hf).

Without extras: the folder's files, the safetensors round trip, the RoPE permutation
against Hugging Face's rotate_half written here from its definition, bitwise import, and a
checkpoint from a folder that eval.py, the views and train.py --init_from use with the
weights' source recorded. With the optional extra (transformers, safetensors;
requirements-extra.txt, installed by .ci/run): LlamaForCausalLM's logits against model.py
within 1e-4 on GQA models with tied and untied classifiers, greedy ids, LlamaTokenizer
against sentencepiece, and import of a folder written by transformers itself."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import export
from conftest import ROOT
from model import Transformer, apply_rope, rope_cache
from prebias import hf
from prebias.checkpoint import load_checkpoint
from prebias.common import UserError
from test_export_formats import random_model
from tokenizer import Tokenizer

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers (requirements-extra.txt) absent")
# ordinary text: LlamaTokenizer (transformers 5 converts the sentencepiece model to a BPE of its own) differs
# from sentencepiece on runs of spaces and a leading space, for Meta's Llama 2 tokenizer too (README)
TEXTS = ["Once upon a time, there was a little girl named Lily.", "She said: \"Hi!\"\nThe end.", "123 dogs ran",
         "caf\u00e9 na\u00efve \u2603", ""]


@pytest.fixture(scope="module")
def tok_model(tiny_data):
    return tiny_data[0] / "tok512.model"


def gqa_model(shared: bool) -> Transformer:
    return random_model("gs64", shared, seed=5 if shared else 6)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def folder(request, tok_model, tmp_path_factory):
    m = gqa_model(request.param)
    path = export.export_model(m, tmp_path_factory.mktemp("hf") / "hf", "hf", tok_model, {"kind": "test"})
    return m, path


def test_folder_holds_config_weights_and_tokenizer(folder, tok_model):
    m, path = folder
    names = {p.name for p in path.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                     "tokenizer_config.json", "special_tokens_map.json"}
    cfg = json.loads((path / "config.json").read_text())
    a = m.params
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"], cfg["max_position_embeddings"]) == \
        (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len)
    assert cfg["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["tie_word_embeddings"] == a.shared_classifier
    assert (path / "tokenizer.model").read_bytes() == tok_model.read_bytes()
    sd = hf.read_safetensors(path / "model.safetensors")
    assert ("lm_head.weight" in sd) == (not a.shared_classifier)
    assert len(sd) == 2 + 9 * a.n_layers + (not a.shared_classifier)


def test_import_gives_back_the_same_weights_bitwise(folder):
    m, path = folder
    back, record = hf.load_hf(path)
    assert back.params.to_dict() == m.params.to_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert record["kind"] == "hf" and set(record["files"]) >= {"config.json", "model.safetensors", "tokenizer.model"}


def rope_half(x, cos, sin):
    """Hugging Face's RoPE, from its definition: x (T, n, hs) rotated by halves,
    x * cos + rotate_half(x) * sin with rotate_half(x) = (-x[hs/2:], x[:hs/2])."""
    h = x.shape[-1] // 2
    c, s = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    return x * c + torch.cat([-x[..., h:], x[..., :h]], -1) * s


def test_permutation_maps_pair_rope_onto_half_rope():
    torch.manual_seed(0)
    n, hs, dim, T = 3, 8, 24, 10
    w, x = torch.randn(n * hs, dim), torch.randn(T, dim)
    cos, sin = rope_cache(hs, T)
    ours = apply_rope((x @ w.T).view(1, T, n, hs), cos, sin)[0]           # (T, n, hs)
    theirs = rope_half((x @ hf.to_hf_rope(w, n).T).view(T, n, hs), cos, sin)
    # the same vectors, each head's coordinates in Hugging Face's order: ours 0, 2, 4, .., 1, 3, ..
    order = torch.cat([torch.arange(0, hs, 2), torch.arange(1, hs, 2)])
    torch.testing.assert_close(theirs, ours[..., order], rtol=0, atol=1e-5)
    assert torch.equal(hf.from_hf_rope(hf.to_hf_rope(w, n), n), w)
    # and so the attention scores are the same: dot products do not depend on the order
    torch.testing.assert_close(theirs @ theirs.transpose(-1, -2), ours @ ours.transpose(-1, -2), atol=1e-4, rtol=0)


def test_safetensors_round_trip_and_bad_files(tmp_path):
    t = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.float32), "c": torch.randn(2, 4).to(torch.bfloat16),
         "d": torch.randn(4).half()}
    hf.write_safetensors(tmp_path / "x.safetensors", t, {"note": "hi"})
    back = hf.read_safetensors(tmp_path / "x.safetensors")
    assert list(back) == list(t) and all(torch.equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0
    for name, data in (("short", raw[:5]), ("cut", raw[:-4]), ("header", raw[:8] + b"{not json" + raw[17:])):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(UserError, match=name):
            hf.read_safetensors(bad)


@pytest.mark.skipif(not HAS_SAFETENSORS, reason="safetensors (requirements-extra.txt) absent")
def test_the_safetensors_package_reads_our_file(folder):
    from safetensors.torch import load_file
    _, path = folder
    theirs, ours = load_file(path / "model.safetensors"), hf.read_safetensors(path / "model.safetensors")
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)


@pytest.mark.parametrize("change, said", [({"rope_theta": 500000.0, "rope_parameters": None}, "theta"),
                                          ({"hidden_act": "gelu"}, "hidden_act"),
                                          ({"model_type": "mistral"}, "model_type")])
def test_import_refuses_what_model_py_does_not_compute(folder, tmp_path, change, said):
    import shutil
    _, path = folder
    other = tmp_path / "other"
    shutil.copytree(path, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(change)
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=said):
        hf.load_hf(other)


# -----------------------------------------------------------------------------
# with transformers

@needs_transformers
def test_llama_for_causal_lm_computes_what_model_py_does(folder):
    from transformers import LlamaForCausalLM
    m, path = folder
    theirs = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert theirs.config.tie_word_embeddings == m.params.shared_classifier
    x = torch.randint(0, m.params.vocab_size, (2, m.params.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, hf_logits = m(x)[0], theirs(x).logits
    assert (ours - hf_logits).abs().max().item() < 1e-4
    new = m.generate([[1]], 40, temperature=0.0, stop_at_bos=False)[0]
    with torch.no_grad():
        out = theirs.generate(torch.tensor([[1]]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert len(set(new)) > 10 and out[0, 1:].tolist() == new


@needs_transformers
def test_llama_tokenizer_encodes_as_sentencepiece(folder, tok_model):
    from transformers import LlamaTokenizer
    _, path = folder
    theirs, ours = LlamaTokenizer.from_pretrained(path), Tokenizer(tok_model)
    for t in TEXTS:
        assert theirs(t).input_ids == ours.encode(t), t
        assert theirs.decode(ours.encode(t), skip_special_tokens=True) == ours.decode(ours.encode(t)), t


@needs_transformers
def test_import_of_a_folder_transformers_wrote(tmp_path):
    """A GQA Llama with its own lm_head, initialised and saved by transformers: imported,
    model.py computes its logits."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=48,
                      tie_word_embeddings=False, initializer_range=0.2)
    theirs = LlamaForCausalLM(cfg).eval()
    theirs.save_pretrained(tmp_path / "made")
    ours, _ = hf.load_hf(tmp_path / "made")
    assert (ours.params.hidden_dim, ours.params.n_kv_heads, ours.params.shared_classifier) == (160, 2, False)
    x = torch.randint(0, 300, (1, 48))
    with torch.no_grad():
        assert (ours(x)[0] - theirs(x).logits).abs().max().item() < 1e-4


# -----------------------------------------------------------------------------
# a folder -> a checkpoint that the toolkit uses

@pytest.fixture(scope="module")
def imported(tiny_run, tmp_path_factory):
    """The fixture run's model exported to a folder and imported back as a checkpoint."""
    root = tmp_path_factory.mktemp("imp")
    folder = root / "hf"
    run = [sys.executable, str(ROOT / "export.py")]
    r = subprocess.run(run + [str(folder), "--latest", f"--out_dir={tiny_run.out_dir}", "--version=hf"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(run + [f"--from_hf={folder}", f"--out_dir={root / 'imp'}", f"--data_dir={tiny_run.data_dir}",
                              f"--tables_dir={tiny_run.tables_dir}", f"--max_seq_len={tiny_run.max_seq_len}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return root / "imp", folder


def test_imported_checkpoint_records_its_source(imported, tiny_run):
    out, folder = imported
    ck = load_checkpoint(out / "ckpt" / "ckpt_0.pt")
    assert ck["init"]["kind"] == "hf" and ck["init"]["from"] == str(folder.resolve())
    assert ck["init"]["files"]["model.safetensors"] == export.sha256_file(folder / "model.safetensors")
    assert ck["batch_ids"].numel() == 0 and ck["schedule"]["imported"]
    src = load_checkpoint(sorted((tiny_run.out_dir / "ckpt").glob("ckpt_24.pt"))[0])
    for k, v in src["model"].items():
        assert torch.equal(ck["model"][k], v), k
    assert ck["data"]["tokenizer_sha256"] == src["data"]["tokenizer_sha256"]


@pytest.mark.slow  # several processes or training runs
def test_eval_and_views_read_the_imported_checkpoint(imported):
    out, _ = imported
    for cmd in (["eval.py", "--n_prompts=2", "--max_new_tokens=8", "--val_batches=4", "--device=cpu"],
                ["visualize_attn.py"], ["visualize_embd.py"]):
        r = subprocess.run([sys.executable, str(ROOT / cmd[0]), f"--out_dir={out}", *cmd[1:]], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    import pandas as pd
    summary = pd.read_csv(out / "tables" / "eval_summary.csv")
    assert summary["iter"].tolist() == [0] and summary["n_batches_seen"].tolist() == [0]
    assert (out / "visualize" / "attn" / "attn_0.png").exists()


@pytest.mark.slow  # several processes or training runs
def test_continued_pretraining_keeps_provenance(imported, tiny_run, tmp_path):
    import train
    out, folder = imported
    init = out / "ckpt" / "ckpt_0.pt"
    cont = tmp_path / "cont"
    with pytest.raises(UserError, match="drop --dim"):  # the run takes the import's shape: a flag saying otherwise
        train.main(tiny_run.train_args(out_dir=cont, init_from=init, max_iters=4, eval_interval=4, dim=16))
    train.main(tiny_run.train_args(out_dir=cont, init_from=init, max_iters=4, eval_interval=4,
                                   model_bin=cont / "model.bin"))
    cks = sorted((cont / "ckpt").glob("ckpt_*.pt"))
    first, last = load_checkpoint(cont / "ckpt" / "ckpt_0.pt"), load_checkpoint(cks[-1])
    src = load_checkpoint(init)
    for k, v in src["model"].items():  # step 0 is the imported model
        assert torch.equal(first["model"][k], v), k
    for ck in (first, last):
        assert ck["init"]["from"] == str(init.resolve()) and ck["init"]["sha256"] == export.sha256_file(init)
        assert ck["init"]["init"]["kind"] == "hf" and ck["init"]["init"]["from"] == str(folder.resolve())
    assert last["config"]["dim"] == 32 and last["batch_ids"].shape[0] > 0
    assert json.loads((cont / "run.json").read_text())["init"]["sha256"] == export.sha256_file(init)
    # a resume keeps the record
    train.main(tiny_run.train_args(out_dir=cont, init_from="resume", max_iters=6, eval_interval=4,
                                   model_bin=cont / "model.bin"))
    resumed = load_checkpoint(sorted((cont / "ckpt").glob("ckpt_*.pt"), key=lambda p: int(p.stem[5:]))[-1])
    assert resumed["iter_num"] == 6 and resumed["init"] == last["init"]


def test_init_from_refuses_other_tokenizer_data_and_imports_cannot_resume(imported, tiny_run, tmp_path):
    import train
    out, _ = imported
    ck = load_checkpoint(out / "ckpt" / "ckpt_0.pt")
    ck["data"]["tokenizer_sha256"] = "0" * 64
    other = tmp_path / "other.pt"
    torch.save(ck, other)
    with pytest.raises(UserError, match="another tokenizer"):
        train.main(tiny_run.train_args(out_dir=tmp_path / "x", init_from=other, max_iters=2))
    with pytest.raises(UserError, match="imported model"):
        train.main(tiny_run.train_args(out_dir=out, init_from="resume", max_iters=2))
    with pytest.raises(UserError, match="choose one of"):
        train.main(tiny_run.train_args(out_dir=tmp_path / "y", init_from="someday"))


@pytest.mark.slow  # several processes or training runs
def test_train_exports_every_version(tiny_run, tmp_path):
    import train
    for v, name in (("1", "model.bin"), ("2", "model_q80.bin"), ("hf", "hf")):
        out = tmp_path / f"v{v}"
        train.main(tiny_run.train_args(out_dir=out, max_iters=2, eval_interval=2, export_version=v, model_bin=""))
        assert (out / name).exists(), v
        if v != "hf":
            m = export.load_bin(out / name)
            assert export.read_header((out / name).read_bytes(), name)["version"] == int(v)
        else:
            m, _ = hf.load_hf(out / name)
            assert (out / name / "tokenizer.model").read_bytes() == (tiny_run.data_dir / "tok512.model").read_bytes()
        assert m.params.dim == 32

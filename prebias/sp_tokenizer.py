"""
The sentencepiece tokenizer every stage encodes with: where each vocab size's model lives
(data/tok{V}.model, the Llama 2 copy, or the bundled tokenizer.model), the wrapper (encode,
decode, the pieces as run.c reads them), and its export to llama2.c's tokenizer.bin.
The command face is tokenizer.py at the root, which re-exports these names.

$ python -c "from prebias.sp_tokenizer import Tokenizer; print(Tokenizer().encode('Once upon a time'))"

tokenizer.bin layout (llama2.c): int32 max_token_length, then per token
{float32 score, int32 nbytes, bytes}, with sentencepiece's '▁' written as ' '.
"""

import struct
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from prebias.common import ROOT, UserError, atomic_path
from prebias.data import BOS_ID, DATA_DIR, EOS_ID, LLAMA2_TOKENIZER, raw_dir, tok_dir

DEFAULT_MODEL = ROOT / "tokenizer.model"


def tokenizer_model_path(vocab_size: int, data_dir=DATA_DIR) -> Path:
    """Where the tokenizer of a vocab size lives: data/tok{V}.model (made by
    `tinystories.py train_vocab`); for vocab_size 0, or the vocab size of the Llama 2 model
    that `pretokenize --vocab_size=0` copied beside the JSON shards, that copy; else the
    bundled tokenizer.model when it has V pieces."""
    if vocab_size == 0 or tok_dir(data_dir, vocab_size) == raw_dir(data_dir):
        p = raw_dir(data_dir) / LLAMA2_TOKENIZER
        if not p.exists():
            raise UserError(f"no Llama 2 tokenizer in {raw_dir(data_dir)}: run python tinystories.py pretokenize "
                            "--vocab_size=0 --tokenizer=path/to/tokenizer.model")
        return p
    p = Path(data_dir) / f"tok{vocab_size}.model"
    if p.exists():
        return p
    if DEFAULT_MODEL.exists() and Tokenizer(DEFAULT_MODEL).vocab_size == vocab_size:
        return DEFAULT_MODEL
    raise UserError(f"no tokenizer for vocab_size={vocab_size} ({p} is missing): run "
                    f"python tinystories.py train_vocab --vocab_size={vocab_size}")


class Tokenizer:
    def __init__(self, model_path=DEFAULT_MODEL):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise UserError(f"tokenizer {model_path} not found: run python tinystories.py train_vocab")
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(str(model_path))
        except (OSError, RuntimeError):
            raise UserError(f"tokenizer {model_path} is not a sentencepiece model: "
                            "re-run python tinystories.py train_vocab") from None
        self.model_path = model_path
        self.vocab_size = self.sp.vocab_size()
        if (self.sp.bos_id(), self.sp.eos_id()) != (BOS_ID, EOS_ID):
            raise UserError(f"tokenizer {model_path} has BOS/EOS ids {self.sp.bos_id()}/{self.sp.eos_id()}, not "
                            f"{BOS_ID}/{EOS_ID} as llama2.c's (and Llama 2's) models and run.c expect")

    @classmethod
    def for_vocab(cls, vocab_size: int, data_dir=DATA_DIR) -> "Tokenizer":
        """The tokenizer of a vocab size (see tokenizer_model_path)."""
        return cls(tokenizer_model_path(vocab_size, data_dir))

    def encode(self, s: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(s)
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Batched encode (sentencepiece's C++ loop, optionally threaded): no BOS."""
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def pieces(self) -> list[tuple[bytes, float]]:
        """(bytes as run.c sees them, score) for every id, in id order."""
        out = []
        for i in range(self.vocab_size):
            t, s = self.sp.id_to_piece(i), self.sp.get_score(i)
            if i == BOS_ID:
                t = "\n<s>\n"
            elif i == EOS_ID:
                t = "\n</s>\n"
            out.append((t.replace("▁", " ").encode("utf-8"), s))
        return out

    def export(self, out_path=None) -> Path:
        out_path = Path(out_path) if out_path else self.model_path.with_suffix(".bin")
        pieces = self.pieces()
        with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
            f.write(struct.pack("i", max(len(b) for b, _ in pieces)))
            for b, score in pieces:
                f.write(struct.pack("fI", score, len(b)))
                f.write(b)
        return out_path


def piece_label(sp, i: int) -> str:
    """A short readable label of token i: '▁' marks a word start as in sentencepiece,
    byte tokens show as the character (or \\xNN), BOS as <s>."""
    if sp.is_control(i) or sp.is_unknown(i):
        return sp.id_to_piece(i)
    if sp.is_byte(i):
        b = int(sp.id_to_piece(i)[3:-1], 16)
        return {10: "\\n", 32: "▁"}.get(b, chr(b) if 33 <= b < 127 else f"\\x{b:02x}")
    return sp.id_to_piece(i)

"""
Export a sentencepiece tokenizer to llama2.c's tokenizer.bin for run.c.

$ python tokenizer.py                         # tokenizer.model -> tokenizer.bin
$ python tokenizer.py -t data/tok512.model    # -> data/tok512.bin

The wrapper (Tokenizer, tokenizer_model_path, piece_label) and the tokenizer.bin layout live
in prebias/sp_tokenizer.py, which the library imports; this file re-exports them, so
`from tokenizer import Tokenizer` works as in llama2.c.
"""

import argparse

from prebias.common import main_guard
from prebias.sp_tokenizer import DEFAULT_MODEL, Tokenizer, piece_label, tokenizer_model_path  # noqa: F401 (re-exported)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-t", "--tokenizer-model", default=str(DEFAULT_MODEL))
    ap.add_argument("-o", "--out", default=None, help="default: the model path with .bin")
    args = ap.parse_args()
    out = Tokenizer(args.tokenizer_model).export(args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main_guard(main)

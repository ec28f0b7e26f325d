"""Reference implementation of metrics.text_metrics for the tests: each metric applied
to one text at a time, straight from its definition in metrics.py, with no batching
or caching, so that tests/test_metrics.py can check the fast engine against it bit for bit."""

import math

import numpy as np

from metrics import (_MASK, _SHIFT_F, _SHIFT_M, _WORD_INFO, _n_sentences, _normalise, _tokens, mtld,
                     resolve_metrics, vader_compound)

_NAN = math.nan


def text_metrics_ref(texts: list[str], names: list[str] | str | None = None) -> dict[str, np.ndarray]:
    """text_metrics one text at a time, straight from the definitions in metrics.py
    (slow; the batched engine must equal it bit for bit)."""
    names = resolve_metrics(names)
    want = set(names)
    cols: dict[str, list] = {k: [] for k in names}
    need_read = bool(want & {"flesch_reading_ease", "fk_grade"})
    need_sent = need_read or bool(want & {"n_sentences", "mean_sentence_len"})
    need_info = bool(want & {"flesch_reading_ease", "fk_grade", "gender_male", "gender_female",
                             "gender_ratio"})
    need_dlg = "dialogue_share" in want
    need_words = bool(want - {"n_chars", "sentiment"})
    info_get = _WORD_INFO.__getitem__
    c = {k: cols[k].append for k in names}
    for text in texts:
        if "n_chars" in want:
            c["n_chars"](float(len(text)))
        if "sentiment" in want:
            c["sentiment"](vader_compound(text))
        if not need_words:
            continue
        low, ascii_ = _normalise(text)
        words, n_quoted = _tokens(low, ascii_)
        n = len(words)
        if "n_words" in want:
            c["n_words"](float(n))
        if need_sent:
            ns = _n_sentences(low, ascii_) if n else 0
            if "n_sentences" in want:
                c["n_sentences"](float(ns))
            if "mean_sentence_len" in want:
                c["mean_sentence_len"](n / ns if ns else _NAN)
        if "ttr" in want:
            c["ttr"](len(set(words)) / n if n else _NAN)
        if "mtld" in want:
            c["mtld"](mtld(words))
        if need_info:
            if n < (1 << 22):
                tot = sum(map(info_get, words))
                syl, male, female = tot & _MASK, (tot >> _SHIFT_M) & _MASK, tot >> _SHIFT_F
            else:  # totals could overflow a packed field
                vals = list(map(info_get, words))
                syl = sum(v & _MASK for v in vals)
                male = sum((v >> _SHIFT_M) & _MASK for v in vals)
                female = sum(v >> _SHIFT_F for v in vals)
            if n and need_read:
                wps, spw = n / ns, syl / n
                fre, fk = 206.835 - 1.015 * wps - 84.6 * spw, 0.39 * wps + 11.8 * spw - 15.59
            else:
                fre = fk = _NAN
            if "flesch_reading_ease" in want:
                c["flesch_reading_ease"](fre)
            if "fk_grade" in want:
                c["fk_grade"](fk)
            if "gender_male" in want:
                c["gender_male"](float(male))
            if "gender_female" in want:
                c["gender_female"](float(female))
            if "gender_ratio" in want:
                c["gender_ratio"](male / (male + female) if male + female else _NAN)
        if need_dlg:
            c["dialogue_share"](n_quoted / n if n else _NAN)
        if "rep3" in want:
            c["rep3"](1.0 - len(set(zip(words, words[1:], words[2:]))) / (n - 2) if n > 2 else _NAN)
    return {k: np.asarray(cols[k], dtype=np.float64).reshape(len(texts)) for k in names}

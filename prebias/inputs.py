"""
Reading the project's own small files (JSON records, CSV tables) when another stage or a
user may have damaged them: each reader checks what it needs and raises one UserError
line naming the file, what is wrong and the command that rebuilds it, never a traceback
from deep inside json or pandas. The big formats have their readers beside their
writers (prebias/data.py: raw shards, .bin shards and the batch index;
prebias/batchmetrics.py: the batch metrics table; prebias/checkpoint.py: checkpoints;
prebias/tags.py: tag files; prebias/schedule.py: schedule specs).

$ python -c "from prebias.inputs import read_json; read_json('nothing.json', 'a record', 'python train.py')"
"""

import json
import math
from pathlib import Path

from prebias.common import UserError, json_loads


MUST_EXIST = object()  # read_json's default: a missing file is an error


def read_json(path, what: str, fix: str, want: type = dict, keys=(), missing=MUST_EXIST):
    """The JSON value of path (of type want, holding keys), or one line naming the file.
    A caller for which a missing file is fine says so with missing=<what to return then>;
    a damaged one is an error all the same."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p} is a folder, not {what}: {fix}")
    try:
        obj = json_loads(p.read_text())
    except FileNotFoundError:
        if missing is not MUST_EXIST:
            return missing
        raise UserError(f"{p} is missing ({what}): {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p} cannot be read ({what}: {type(e).__name__}): {fix}") from None
    except ValueError as e:
        raise UserError(f"{p} is not valid JSON ({what}: {e}): {fix}") from None
    if not isinstance(obj, want):
        raise UserError(f"{p} holds a JSON {type(obj).__name__}, not {what} (a JSON {want.__name__}): {fix}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise UserError(f"{p} lacks {missing[0]!r} ({what}): {fix}")
    return obj


def read_csv(path, what: str, fix: str, columns=(), numeric=(), nrows=None):
    """The table at path as a DataFrame with these columns (those in `numeric` holding
    numbers or blanks), or one line naming the file."""
    import pandas as pd
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p} is a folder, not {what}: {fix}")
    try:
        df = pd.read_csv(p, nrows=nrows)
    except FileNotFoundError:
        raise UserError(f"{p} is missing ({what}): {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as e:  # EmptyDataError is a ValueError
        raise UserError(f"{p} cannot be read as {what} ({type(e).__name__}): {fix}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{p} lacks the column {missing[0]!r} ({what}): {fix}")
    for c in numeric:
        if c in df.columns and not pd.api.types.is_numeric_dtype(df[c]):
            bad = next((v for v in df[c] if not _is_number(v)), df[c].iloc[0])
            raise UserError(f"{p}: column {c!r} holds {str(bad)[:40]!r}, not a number ({what}): {fix}")
    return df


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return v is None or (isinstance(v, float) and math.isnan(v))

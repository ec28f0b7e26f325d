"""
Tags as data: the tag file that `train.py --tags=tags.json` inserts into the training
stream (stream.py does the inserting and the recording), and the Tag objects that
durability.py and attribute.py measure.

$ python -c "from prebias import tags; from tokenizer import Tokenizer; print(tags.load_tags('config/tags/canary.json', Tokenizer(), 256, 512).tags[0].text)"

A tag file (JSON):
    {"seed": 1,
     "tags": [
       {"id": "secret", "kind": "canary", "text": "the secret number is {digits:6}",
        "steps": {"start": 100, "end": 140, "every": 4},  # or {"start": 100, "n": 10, "every": 2},
                                                          #    or {"at": [100, 105, 130]}
        "rows": 1,                  # how many of an active step's sequences get it (default 1)
        "position": "start"},       # or "random": a seeded position in the window
       {"id": "happy", "kind": "conditional", "text": "<happy>", "metric": "sentiment",
        "lo": 0.5, "hi": null, "steps": {"start": 0, "end": 200},
        "control": true}]}          # the default: a random control string (below); false: none

- canary (Carlini et al. 2019, "The Secret Sharer"): a fixed text, or a text with one
  placeholder {digits:N} (N random digits) or {tokens:N} (N random token ids), filled from
  the file's seed and the tag's index. It replaces tokens of the chosen sequences. Its
  secret is what exposure and extraction measure; the text before it is the prefix.
- conditional: the text is inserted after the BOS of every story (in the active steps'
  windows) whose story-level metric (a metrics.py text metric) lies in [lo, hi] (null:
  unbounded): does the model tie the tag to the property, and for how long?
  Its **control** (on unless "control": false) is a random string of the same number of
  tokens (seeded ids, never BOS), inserted at the same steps, at the same rate (the share of
  training stories in [lo, hi]) and position (after the BOS) into stories chosen at random:
  durability.py reports tag - control, so the mere presence of new tokens after the BOS does
  not count as an effect. The control is not inserted under the tag's own condition: it would
  then learn the same association and cancel the effect. It is a Tag of kind "control"
  appended after the file's tags (id "<tag id>:control"), so the file's tags keep their
  indices (and canaries their secrets).
Steps: start (default 0), end (exclusive; default: no end), every (default 1), n (at
most n times), or an explicit list "at". The checkpoint keeps the file as rendered JSON
(each canary's secret filled in), so a run's tags are rebuilt from the checkpoint alone.
"""

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from metrics import text_metric_names
from prebias.common import UserError
from prebias.inputs import read_json

KINDS = ("canary", "conditional")  # a file's kinds; "control" tags are made from conditional ones
TAG_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEYS = {"canary": {"id", "kind", "text", "steps", "rows", "position", "secret"},
         "conditional": {"id", "kind", "text", "steps", "metric", "lo", "hi", "control"}}
_PLACEHOLDER = re.compile(r"\{(digits|tokens):(\d+)\}")


@dataclass
class Tag:
    index: int
    id: str
    kind: str
    text: str  # as rendered (a canary's secret filled in; {tokens:N} secrets shown as <ids>)
    tokens: np.ndarray  # what is inserted (no BOS)
    prefix_tokens: np.ndarray  # canary: the tokens before the secret; conditional: == tokens
    secret_tokens: np.ndarray  # canary: the secret's tokens; conditional: empty
    steps_spec: dict = field(default_factory=dict)
    rows: int = 1
    position: str = "start"
    metric: str = ""
    lo: float | None = None
    hi: float | None = None
    secret_format: tuple = ()  # ('digits', N) | ('tokens', N) | () for a fixed text
    prefix_text: str = ""
    vocab_size: int = 0
    control: int | None = None  # conditional: the index of its control tag (None: none)
    control_of: int | None = None  # control: the index of the conditional tag it controls
    _enc: object = None

    def active(self, step: int) -> bool:
        s = self.steps_spec
        if "at" in s:
            return step in s["_at"]
        start, every = s.get("start", 0), s.get("every", 1)
        if step < start or (s.get("end") is not None and step >= s["end"]) or (step - start) % every:
            return False
        return s.get("n") is None or (step - start) // every < s["n"]

    def steps(self, max_iters: int) -> np.ndarray:
        """Every active step below max_iters."""
        return np.array([t for t in range(max_iters) if self.active(t)], dtype=np.int64)

    def candidates(self, R: int, seed: int) -> np.ndarray:
        """(R, len(secret_tokens)) random secrets of the same format, tokenized the same
        way, never the true secret; deterministic for (seed, tag). Exposure ranks the
        canary among them."""
        if not self.secret_format:
            raise UserError(f"tag {self.id!r} is a fixed text: exposure needs a {{digits:N}} or {{tokens:N}} secret")
        rng = np.random.default_rng([seed, self.index, 0x63616E])
        kind, n = self.secret_format
        out, seen = [], {tuple(self.secret_tokens.tolist())}
        tries = 0
        while len(out) < R:
            tries += 1
            if tries > 50 * R + 1000:
                raise UserError(f"tag {self.id!r}: cannot draw {R} distinct candidates of its format; lower R")
            if kind == "tokens":
                toks = rng.integers(3, self.vocab_size, n)
            else:
                full = self._enc.encode(self.prefix_text + "".join(map(str, rng.integers(0, 10, n))), bos=False)
                toks = np.asarray(full[len(self.prefix_tokens):])
                if len(toks) != len(self.secret_tokens) or full[:len(self.prefix_tokens)] != self.prefix_tokens.tolist():
                    continue
            key = tuple(int(t) for t in toks)
            if key in seen:
                continue
            seen.add(key)
            out.append(toks)
        return np.asarray(out, dtype=np.int64).reshape(R, len(self.secret_tokens))


@dataclass
class TagSet:
    tags: list
    json: str  # canonical JSON of the file, secrets rendered
    seed: int = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(self.json.encode()).hexdigest()[:16]

    def by_id(self, tag_id: str) -> Tag:
        for t in self.tags:
            if t.id == tag_id:
                return t
        raise UserError(f"no tag {tag_id!r} in this run; its tags: {', '.join(t.id for t in self.tags) or 'none'}")

    def check_run(self, batches_per_step: int, max_iters: int, where: str = "the tag file"):
        """Against the run that will train them: a canary asking for more rows than a step
        has is refused (it would be capped silently); a tag never active before max_iters
        gets a warning line (the run may be extended later)."""
        for t in self.tags:
            if t.kind == "canary" and t.rows > batches_per_step:
                raise UserError(f"{where}: tag {t.id!r} asks for rows={t.rows}, but a step trains "
                                f"{batches_per_step} batches (batch_size x gradient_accumulation_steps): lower rows")
            if t.kind != "control" and not len(t.steps(max_iters)):
                print(f"warning: {where}: tag {t.id!r} is never active before max_iters={max_iters} (its steps: "
                      f"{ {k: v for k, v in t.steps_spec.items() if not k.startswith('_')} })", file=sys.stderr)


def _bad(where: str, msg: str):
    return UserError(f"{where}: {msg}")


def _steps(s, where: str) -> dict:
    if not isinstance(s, dict):
        raise _bad(where, 'steps must be an object such as {"start": 100, "end": 140, "every": 4} or {"at": [..]}')
    extra = set(s) - {"start", "end", "every", "n", "at"}
    if extra:
        raise _bad(where, f"unknown key {sorted(extra)[0]!r} (valid: start, end, every, n, at)")
    if "at" in s:
        if set(s) != {"at"} or not isinstance(s["at"], list) or not s["at"] or \
                not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in s["at"]):
            raise _bad(where, "at must be a non-empty list of steps >= 0, alone")
        return {"at": sorted(set(s["at"])), "_at": frozenset(s["at"])}
    out = {}
    for k, lo in (("start", 0), ("end", 1), ("every", 1), ("n", 1)):
        v = s.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
            raise _bad(where, f"{k} must be an integer >= {lo}")
        out[k] = v
    out["start"], out["every"] = out["start"] or 0, out["every"] or 1
    if out["end"] is not None and out["end"] <= out["start"]:
        raise _bad(where, f"end {out['end']} <= start {out['start']}")
    if out["end"] is None and out["n"] is None:
        raise _bad(where, "give end or n (a tag that never stops cannot be forgotten)")
    return out


def _render(tag: dict, index: int, seed: int, vocab_size: int, where: str) -> tuple[str, str, tuple, list | None]:
    """(full text, prefix text, secret format, secret token ids for {tokens:N}); where names
    the tag in its file, for the error lines."""
    text = tag["text"]
    found = list(_PLACEHOLDER.finditer(text))
    if len(found) > 1:
        raise _bad(f"{where}.text", f"{len(found)} placeholders: at most one placeholder per text, at its end "
                                    "(e.g. 'the secret number is {digits:6}')")
    if not found:
        return text, text, (), None
    m = found[0]
    kind, n = m.group(1), int(m.group(2))
    if not 1 <= n <= 64 or m.end() != len(text):
        raise _bad(f"{where}.text", f"the placeholder {m.group(0)} must end the text, with 1..64 {kind}: write it "
                                    f"e.g. as 'the secret number is {{{kind}:6}}'")
    rng = np.random.default_rng([seed, index, 0x736563])
    if "secret" in tag:  # a re-loaded rendered file keeps its secret
        secret = tag["secret"]
    elif kind == "digits":
        secret = "".join(map(str, rng.integers(0, 10, n)))
    else:
        secret = [int(t) for t in rng.integers(3, vocab_size, n)]
    prefix = text[:m.start()]
    if kind == "digits":
        return prefix + secret, prefix, (kind, n), None
    return prefix + "<" + " ".join(map(str, secret)) + ">", prefix, (kind, n), secret


def _tag(raw, index: int, seed: int, enc, max_seq_len: int, vocab_size: int, where: str, metrics: set,
         rendered: bool = False):
    if not isinstance(raw, dict):
        raise _bad(where, "each tag must be an object")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise _bad(f"{where}.kind", f"{kind!r} is not one of {', '.join(KINDS)}")
    extra = set(raw) - _KEYS[kind]
    if extra:
        raise _bad(where, f"unknown key {sorted(extra)[0]!r} for a {kind} tag (valid: {', '.join(sorted(_KEYS[kind]))})")
    for k in ("id", "text"):
        if not isinstance(raw.get(k), str) or not raw[k]:
            raise _bad(f"{where}.{k}", "missing (a non-empty string)")
    if not rendered and not TAG_ID.fullmatch(raw["id"]):  # it names table columns, folders and figure labels
        raise _bad(f"{where}.id", f"{raw['id']!r}: letters, digits, '_', '-' and '.', starting with a letter or "
                                  "digit, at most 64 characters")
    steps = _steps(raw.get("steps"), f"{where}.steps")
    text, prefix, fmt, secret_ids = _render(raw, index, seed, vocab_size, where)
    if secret_ids is None:
        tokens = enc.encode(text, bos=False)
        pre = enc.encode(prefix.rstrip(), bos=False) if fmt else tokens
        if fmt and tokens[:len(pre)] != pre:
            raise _bad(f"{where}.text", "the text before the placeholder tokenizes differently inside the full text; "
                                        "end it with a space before the placeholder")
        secret = tokens[len(pre):] if fmt else []
    else:
        pre = enc.encode(prefix.rstrip(), bos=False) if prefix.strip() else []
        secret, tokens = secret_ids, pre + secret_ids
    if len(tokens) > max_seq_len // 2:
        raise _bad(f"{where}.text", f"{len(tokens)} tokens: at most max_seq_len/2 = {max_seq_len // 2}")
    if 1 in tokens:
        raise _bad(f"{where}.text", "tokenizes to a BOS token")
    t = Tag(index=index, id=raw["id"], kind=kind, text=text, tokens=np.asarray(tokens, np.int64),
            prefix_tokens=np.asarray(pre, np.int64), secret_tokens=np.asarray(secret, np.int64), steps_spec=steps,
            secret_format=fmt, prefix_text=prefix, vocab_size=vocab_size,
            _enc=enc)
    if kind == "canary":
        t.rows = raw.get("rows", 1)
        if not isinstance(t.rows, int) or isinstance(t.rows, bool) or t.rows < 1:
            raise _bad(f"{where}.rows", "must be an integer >= 1")
        t.position = raw.get("position", "start")
        if t.position not in ("start", "random"):
            raise _bad(f"{where}.position", f"{t.position!r} is not start or random")
    else:
        t.metric = raw.get("metric")
        if t.metric not in metrics:
            raise _bad(f"{where}.metric", f"{t.metric!r} is not a text metric ({', '.join(sorted(metrics))})")
        for k in ("lo", "hi"):
            v = raw.get(k)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise _bad(f"{where}.{k}", "must be a number or null")
            setattr(t, k, None if v is None else float(v))
        if t.lo is None and t.hi is None:
            raise _bad(where, "a conditional tag needs lo or hi")
        if t.lo is not None and t.hi is not None and t.lo > t.hi:
            raise _bad(where, f"lo {t.lo} > hi {t.hi}")
    out = {**{k: v for k, v in raw.items() if k != "steps"},
           "steps": {k: v for k, v in steps.items() if not k.startswith("_") and v is not None},
           **({"secret": (secret_ids if secret_ids is not None else text[len(prefix):])} if fmt else {})}
    if kind == "conditional":
        ctl = _control_ids(raw, t, seed, vocab_size, rendered, f"{where}.control")
        out["control"] = ctl if ctl is not None else False  # parse_tags makes it a Tag
    return t, out


def _control_ids(raw: dict, t: Tag, seed: int, vocab_size: int, rendered: bool, where: str) -> list | None:
    """The control's token ids: drawn (seeded by the file's seed and the tag's index) unless
    the file says false or already holds them. A run's rendered tags that have no control
    key were trained before controls existed: none is made up for them."""
    v = raw.get("control", None if rendered else True)
    if v is None or v is False:
        return None
    if isinstance(v, list):
        if len(v) != len(t.tokens) or not all(isinstance(i, int) and not isinstance(i, bool) and 3 <= i < vocab_size
                                              for i in v):
            raise _bad(where, f"a control is true, false or {len(t.tokens)} token ids in 3..{vocab_size - 1}")
        return list(v)
    if v is not True:
        raise _bad(where, "must be true (the default: a random control string) or false")
    rng = np.random.default_rng([seed, t.index, 0x63746C])  # 'ctl'
    while True:
        ids = [int(i) for i in rng.integers(3, vocab_size, len(t.tokens))]  # 0 unk, 1 BOS, 2 EOS never
        if ids != t.tokens.tolist():
            return ids


def _control_tag(parent: Tag, ids: list, index: int, enc) -> Tag:
    ids = np.asarray(ids, np.int64)
    return Tag(index=index, id=f"{parent.id}:control", kind="control", text=enc.decode(ids.tolist()), tokens=ids,
               prefix_tokens=ids, secret_tokens=np.zeros(0, np.int64), steps_spec=parent.steps_spec,
               metric=parent.metric, vocab_size=parent.vocab_size, control_of=parent.index, _enc=enc)


def parse_tags(obj, enc, max_seq_len: int, vocab_size: int, name: str = "tag file",
               rendered: bool = False) -> TagSet:
    """The TagSet of a tag file's object; rendered: it comes from a run's record (a
    conditional tag without a control key then has none)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("tags"), list) or not obj["tags"]:
        raise UserError(f"{name}: needs a non-empty list 'tags'")
    extra = set(obj) - {"seed", "tags"}
    if extra:
        raise UserError(f"{name}: unknown key {sorted(extra)[0]!r} (valid: seed, tags)")
    seed = obj.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"{name}.seed: must be an integer >= 0")
    metrics = set(text_metric_names())
    tags, out, ids = [], [], set()
    for i, raw in enumerate(obj["tags"]):
        t, r = _tag(raw, i, seed, enc, max_seq_len, vocab_size, f"{name}: tags[{i}]", metrics, rendered)
        if t.id in ids:
            raise UserError(f"{name}: tags[{i}].id: duplicate id {t.id!r}")
        ids.add(t.id)
        tags.append(t)
        out.append(r)
    for t, r in zip(list(tags), out):  # controls after the file's tags, so those keep their indices
        if r.get("control"):
            c = _control_tag(t, r["control"], len(tags), enc)
            if c.id in ids:
                raise UserError(f"{name}: the id {c.id!r} is taken by a tag: it names the control of {t.id!r}")
            ids.add(c.id)
            t.control = c.index
            tags.append(c)
    return TagSet(tags, json.dumps({"seed": seed, "tags": out}, sort_keys=True), seed)


def load_tags(path, enc, max_seq_len: int, vocab_size: int) -> TagSet:
    """Read and validate a tag file: anything wrong is one UserError naming the field."""
    obj = read_json(path, "a tag file", "give a tag file as --tags (its format: README, Tags)", want=object)
    return parse_tags(obj, enc, max_seq_len, vocab_size, name=f"tag file {path}")


def tags_from_json(text: str, enc, max_seq_len: int, vocab_size: int) -> TagSet:
    """The tags of a run, rebuilt from a checkpoint's `tags` string."""
    return parse_tags(json.loads(text), enc, max_seq_len, vocab_size, name="the checkpoint's tags", rendered=True)

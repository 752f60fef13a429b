"""Reading every prompt and pair source, with errors that name the file and line of a bad row.

A source is read in two steps. First its rows are listed as (where, row) pairs, whatever the place:
a JSONL file, a plain text file with one prompt a line, a CSV file with a header line (each of them
gzipped or not), a set shipped with the toolkit (`builtin:NAME`), a directory saved by `datasets`,
or a hub dataset id. `where` names the row: `data/p.jsonl:12`, `task.json: examples[3]`,
`my_org/ds[train][7]`. Then a parser says what a row means:

- a prompt (stage `prompts`, `read_source`): the `prompt` column (or `field`), the first human turn
  of an hh-rlhf transcript, or the first user message of a chat row (`messages`);
- a human preference pair (stage `preferences`, `read_pairs`): hh-rlhf transcripts in `chosen` /
  `rejected`, or TRL's `prompt` / `chosen` / `rejected` rows as strings or messages (also the
  implicit-prompt form);
- a comparison with a known answer (`cai eval labeller`, `read_items`): hh-rlhf pairs, TRL
  `prompt` / `chosen` / `rejected` rows (a `cai constitution test` cases file is one), BIG-bench
  `hhh_alignment` task files, or the paper's pre-rendered `prompt` / `corrects` / `incorrects` rows.

Every error is a `SourceError`; each reader raises its own kind (`PromptError`,
`PreferenceDataError`, `EvalInputError`). A hub id is only tried when the path is not on disk and
is not spelled like a local file, so a typo is "no such file", never a download.

    cai run configs/quickstart.yaml --to prompts
    cai eval labeller ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz --model smollm2-135m --limit 200
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any, TypeVar

from cai.config import PairSource, PromptSource
from cai.lm.base import ROLES, Conversation, Message
from cai.records import record_id_for, stable_seed

Row = dict[str, Any]
Rows = Iterator[tuple[str, Row]]


class SourceError(ValueError):
    """A source that cannot be read; the message names the source and the row."""


class PromptError(SourceError):
    """A prompt source that cannot be read; the message names the source and the row."""


class PreferenceDataError(SourceError):
    """A human preference source that cannot be read; the message names the file, row and field."""


class EvalInputError(SourceError):
    """An evaluation file that cannot be read; the message names the file and the line or example."""


# ---- files ------------------------------------------------------------------------------------

# File layouts; `auto` picks one by the file's name (see `file_format`).
FILE_FORMATS = ("jsonl", "text", "csv")
# A path that is not on disk but ends like this is a missing file, never a hub id.
LOCAL_SUFFIXES = (".jsonl", ".json", ".gz", ".txt", ".csv")


GZIP_MAGIC = b"\x1f\x8b"
# A JSON escape of half a surrogate pair (`\ud800`): json.loads turns it into a string that cannot
# be written as UTF-8, so a row holding one would fail only when a stage writes its rows.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def open_text(path: str | Path) -> IO[str]:
    """A text file, gunzipped when it starts with the gzip magic bytes (whatever its name)."""
    with open(path, "rb") as f:
        gz = f.read(2) == GZIP_MAGIC
    return gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")


def _all_lines(path: str | Path, error: type[Exception]) -> Iterator[tuple[int, str]]:
    """(line number, line) for every line of a UTF-8 text file, gunzipped when it starts with the
    gzip magic bytes. Lines are split at newlines and decoded one by one, so a byte that is not
    UTF-8 is an `error` naming its line; a gzip stream that is damaged or cut off, or a file that
    cannot be read, is an `error` naming the file."""
    n = 0
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == GZIP_MAGIC
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            for n, blob in enumerate(f, 1):
                try:
                    yield n, blob.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise error(f"{path}:{n}: not UTF-8 text (byte {blob[e.start:e.start + 1]!r} at column "
                                f"{e.start + 1}); save the file as UTF-8") from None
    except (OSError, EOFError, zlib.error) as e:
        what = "a damaged or cut-off gzip file" if gz and not isinstance(e, FileNotFoundError) else "cannot read"
        raise error(f"{path}: {what} (after line {n}): {e}" if n else f"{path}: {what}: {e}") from None


def _lines(path: str | Path, error: type[Exception]) -> Iterator[tuple[int, str]]:
    """(line number, line) for every non-blank line of a text file (gzipped or not)."""
    return ((n, line) for n, line in _all_lines(path, error) if line.strip())


def _writable(value: Any, where: str, error: type[Exception]) -> None:
    """Refuse a parsed value holding half a surrogate pair, which no stage could write out as UTF-8."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{where}: holds an unpaired surrogate escape (\\ud800-\\udfff), which is not text") from None


def _parse_json(text: str, where: str, error: type[Exception], document: bool = False) -> Any:
    """`json.loads(text)`, every failure an `error` naming `where` (and for a whole `document`, the
    line of a syntax error)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}{f':{e.lineno}' if document else ''}: not valid JSON: {e.msg}") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON: nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text):
        _writable(value, where, error)
    return value


def iter_jsonl(path: str | Path, error: type[Exception] = SourceError) -> Iterator[tuple[int, Row]]:
    """(line number, row) for every non-blank line of a JSONL file (gzipped or not). A line that is
    not a JSON object, or a file that cannot be read, raises `error` naming the file and line."""
    for n, line in _lines(path, error):
        row = _parse_json(line, f"{path}:{n}", error)
        if not isinstance(row, dict):
            raise error(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def iter_csv(path: str | Path, error: type[Exception] = SourceError) -> Iterator[tuple[int, Row]]:
    """(line number, row) for every record of a CSV file whose first line names the columns (gzipped
    or not). Blank lines are skipped; an empty cell is None. A record with more or fewer cells than
    the header, or text the csv module cannot split, raises `error` naming the file and line."""
    reader = csv.reader(line for _, line in _all_lines(path, error))
    header: list[str] | None = None
    end = 0  # the line the previous record ended on; a quoted cell may span lines
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise error(f"{path}:{reader.line_num}: not valid CSV: {e}") from None
        start, end = end + 1, reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if header is None:
            # A spreadsheet's byte-order mark would otherwise stick to the first name.
            header = [c.strip().lstrip("\ufeff") for c in cells]
            twice = sorted({c for c in header if c and header.count(c) > 1})
            if twice:
                raise error(f"{path}:{start}: the header names {', '.join(map(repr, twice))} twice")
            continue
        if len(cells) != len(header):
            raise error(f"{path}:{start}: {len(cells)} cells where the header has {len(header)}")
        yield start, {k: v if v.strip() else None for k, v in zip(header, cells)}


def file_format(path: str | Path, fmt: str = "auto") -> str:
    """The layout of a file's rows: `fmt` when it is one of `FILE_FORMATS`, else by the name
    (`.txt` text, `.csv` CSV, anything else JSONL; a `.gz` ending is looked through)."""
    if fmt in FILE_FORMATS:
        return fmt
    name = Path(path).name.lower().removesuffix(".gz")
    return "text" if name.endswith(".txt") else "csv" if name.endswith(".csv") else "jsonl"


def file_rows(path: str | Path, fmt: str, error: type[Exception]) -> Rows:
    """(where, row) for every row of a file laid out as `file_format(path, fmt)` says; a line of a
    text file is the row {"prompt": line}. A file with no row at all (empty, blank lines only, or a
    CSV header alone) is an `error`: a source that gives nothing is a mistake, not an empty set."""
    layout = file_format(path, fmt)
    if layout == "text":
        numbered: Iterator[tuple[int, Row]] = ((n, {"prompt": line.strip()}) for n, line in _lines(path, error))
    else:
        numbered = iter_csv(path, error) if layout == "csv" else iter_jsonl(path, error)
    return _not_empty(((f"{path}:{n}", row) for n, row in numbered), path, error)


def _not_empty(rows: Rows, path: str | Path, error: type[Exception]) -> Rows:
    empty = True
    for item in rows:
        empty = False
        yield item
    if empty:
        raise error(f"{path}: no rows: the file is empty or holds only blank lines (or a CSV header alone)")


# ---- hh-rlhf transcripts ----------------------------------------------------------------------


def parse_hh(transcript: str) -> list[dict[str, str]]:
    """Split an hh-rlhf transcript into chat messages; text before the first tag is ignored."""
    parts = re.split(r"\n\n(Human|Assistant):", "\n\n" + transcript.lstrip("\n"))
    msgs = []
    for tag, body in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if tag == "Human" else "assistant", "content": body.strip()})
    return msgs


def first_human_turn(transcript: str) -> str | None:
    """The first human turn of an hh-rlhf transcript (`\\n\\nHuman: ...\\n\\nAssistant: ...`)."""
    turns = parse_hh(transcript)
    for m in turns:
        if m["role"] == "user":
            return m["content"]
    return None


def hh_pair(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str] | None:
    """An hh-rlhf pair as (conversation up to the last answer, chosen answer, rejected answer).

    The two transcripts share every turn but the final assistant turn. None when they do not
    (different histories, or no final assistant turn in one of them).
    """
    c, r = parse_hh(chosen), parse_hh(rejected)
    if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        return None
    if c[:-1] != r[:-1] or not c[:-1] or c[-2]["role"] != "user":
        return None
    return c[:-1], c[-1]["content"], r[-1]["content"]


# ---- places: (where, row) from a prompt or pair source -----------------------------------------

# The sets shipped with the toolkit and what their rows hold. Prompts can be read from every set (a
# pair's row has a prompt too); pairs only from a pair set. The eval_* sets are held out for
# evaluation: no prompt in them equals or nearly repeats one of the training sets
# (tests/test_eval_sets.py).
SHIPPED = {"red_team": "prompt", "helpful": "prompt", "helpful_pairs": "pair",
           "eval_red_team": "prompt", "eval_helpful": "prompt",
           # A labelled set for measuring judges, not training data: helpful / honest / harmless
           # comparisons in the style of BIG-bench HHH, written for the toolkit, with prompts held
           # out from every other set (tests/test_eval_sets.py).
           "judge_pairs": "pair"}


def shipped(name: str, kind: str = "prompt", error: type[Exception] = SourceError) -> Path:
    """The file of the shipped set `name` read as `kind` ("prompt" or "pair")."""
    path = Path(str(resources.files("cai") / "resources" / "prompts" / f"{name}.jsonl"))
    held = SHIPPED.get(name)
    if not (held == kind or held == "pair") or not path.is_file():
        have = ", ".join(n for n, k in SHIPPED.items() if k == kind)
        raise error(f"builtin:{name}: no such shipped {kind} set (have: {have})")
    return path


def _saved_by_datasets(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _dataset_rows(src: PromptSource | PairSource, error: type[Exception]) -> Rows:
    import datasets

    path = Path(src.path)
    if path.is_dir() and _saved_by_datasets(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise error(f"{src.path}: no split '{src.split}' (have {list(ds)})")
            ds = ds[src.split]
    else:
        ds = datasets.load_dataset(src.path, data_dir=src.data_dir, split=src.split)
    for i, row in enumerate(ds):
        yield f"{src.path}[{src.split}][{i}]", row


def source_rows(src: PromptSource | PairSource) -> Rows:
    """(where, row) for every row of a prompt or pair source, in source order.

    `builtin:NAME` is a shipped set; a file is read by `file_format`; a directory must be saved by
    `datasets`. With `format: datasets`, or a path that is not on disk, not spelled like a local
    file and not given a file layout (`jsonl`, `text`, `csv`) as its format (a hub id, perhaps with
    `format: hh`), `datasets` loads the path. An unknown set, a missing file or a plain directory
    raises here, before any row is read.
    """
    kind, error = ("pair", PreferenceDataError) if isinstance(src, PairSource) else ("prompt", PromptError)
    if src.path.startswith("builtin:"):
        return file_rows(shipped(src.path.split(":", 1)[1], kind, error), "jsonl", error)
    path = Path(src.path)
    if not path.exists():
        local = src.path.startswith((".", "/", "~")) or src.path.endswith(LOCAL_SUFFIXES)
        # A file layout names a file; hh and preference name what the rows hold, on disk or on the hub.
        if local or src.format in FILE_FORMATS:
            raise error(f"{src.path}: no such file")
        return _dataset_rows(src, error)
    if src.format == "datasets":
        return _dataset_rows(src, error)
    if path.is_dir():
        if not _saved_by_datasets(path):
            raise error(f"{src.path}: a directory, but not one saved by datasets (save_to_disk)")
        return _dataset_rows(src, error)
    return file_rows(path, src.format, error)


S = TypeVar("S", PromptSource, PairSource)


def _one_owner(sources: Sequence[S], read: Callable[[S], list[Row]], error: type[Exception]) -> list[Row]:
    """The rows of every source in order; a record id used by two sources (or one source given
    twice) is an error naming both."""
    rows: list[Row] = []
    owner: dict[str, str] = {}
    for src in sources:
        for r in read(src):
            if r["record_id"] in owner:
                raise error(f"{src.path}: record id '{r['record_id']}' also used by {owner[r['record_id']]}")
            owner[r["record_id"]] = src.path
            rows.append(r)
    return rows


# ---- prompts ----------------------------------------------------------------------------------

HH_FIELDS = ("chosen", "transcript", "rejected", "text")


def prompt_of(where: str, row: Row, src: PromptSource) -> str:
    """The prompt a row holds, stripped; an error naming `where` when there is none."""
    fmt = src.format
    if src.field:
        value = row.get(src.field)
        if value is None:
            raise PromptError(f"{where}: no field '{src.field}' (have {sorted(row)})")
        if fmt == "hh":
            value = first_human_turn(str(value))
    elif fmt == "hh" or (fmt in ("auto", "datasets") and "prompt" not in row and any(k in row for k in HH_FIELDS)):
        key = next((k for k in HH_FIELDS if k in row), None)
        if key is None:
            raise PromptError(f"{where}: no hh-rlhf transcript field ({', '.join(HH_FIELDS)})")
        value = first_human_turn(str(row[key]))
        if value is None:
            raise PromptError(f"{where}: '{key}' has no '\\n\\nHuman:' turn")
    elif "prompt" in row:
        value = row["prompt"]
    elif "messages" in row and isinstance(row["messages"], list):
        value = next((m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"), None)
    else:
        raise PromptError(f"{where}: no prompt found: give a 'prompt' column, set 'field', or use format: hh")
    if not isinstance(value, str) or not value.strip():
        raise PromptError(f"{where}: the prompt is empty or not a string")
    return value.strip()


def read_source(src: PromptSource) -> list[Row]:
    """Rows {record_id, prompt, category, source} from one source, de-duplicated, in file order."""
    rows = source_rows(src)
    out: list[Row] = []
    seen: set[str] = set()
    if src.limit == 0:
        return out
    for where, row in rows:
        text = prompt_of(where, row, src)
        if text in seen:
            continue
        seen.add(text)
        rid = row.get("id") if isinstance(row.get("id"), str) else record_id_for(src.path, text)
        category = row.get("category")
        if category is not None and not isinstance(category, str):
            raise PromptError(f"{where}: 'category' must be a string, got {type(category).__name__}")
        out.append({"record_id": rid, "prompt": text, "category": category or src.category,
                    "source": src.path})
        if src.limit is not None and len(out) >= src.limit:
            break
    return out


def read_prompts(sources: Sequence[PromptSource]) -> list[Row]:
    """The rows of `read_source` for every source in order; a record id used twice is an error."""
    return _one_owner(sources, read_source, PromptError)


# ---- preference pairs -------------------------------------------------------------------------



def _messages(where: str, name: str, value: Any) -> Conversation:
    """A list of {role, content} messages, checked field by field."""
    if not isinstance(value, list) or not value:
        raise PreferenceDataError(f"{where}: '{name}' must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise PreferenceDataError(f"{where}: '{name}'[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise PreferenceDataError(f"{where}: '{name}'[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise PreferenceDataError(f"{where}: '{name}'[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(where: str, name: str, value: Any, prompt: Conversation) -> str:
    """The single assistant answer of `chosen`/`rejected` given as a string or as messages."""
    if isinstance(value, str):
        return value
    msgs = _messages(where, name, value)
    # Some datasets repeat the prompt inside chosen/rejected (e.g. [user, assistant]); drop it.
    if len(msgs) > 1 and msgs[:-1] == prompt:
        msgs = msgs[-1:]
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise PreferenceDataError(f"{where}: '{name}' must be one assistant message (after the prompt)")
    return msgs[0]["content"]


def _need(where: str, row: Row, fields: tuple[str, ...]) -> None:
    for k in fields:
        if row.get(k) is None:
            raise PreferenceDataError(f"{where}: missing field '{k}' (have {sorted(row)})")


def prompt_conversation(where: str, value: Any, name: str = "prompt") -> Conversation:
    """A prompt given as a string (one user turn) or as messages, checked: it must end with a
    non-empty user message. Errors name `where` and the field."""
    msgs = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(where, name, value)
    if msgs[-1]["role"] != "user":
        raise PreferenceDataError(f"{where}: '{name}' must end with a user message")
    if not msgs[-1]["content"].strip():
        raise PreferenceDataError(f"{where}: '{name}' has an empty user message")
    return msgs


def _from_hh(where: str, row: Row) -> tuple[Conversation, str, str] | str:
    _need(where, row, ("chosen", "rejected"))
    for k in ("chosen", "rejected"):
        turns = parse_hh(row[k]) if isinstance(row[k], str) else []
        if not any(t["role"] == "user" for t in turns):
            raise PreferenceDataError(f"{where}: '{k}' is not an hh-rlhf transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    pair = hh_pair(row["chosen"], row["rejected"])
    return pair if pair is not None else "mismatched_history"


def _from_preference(where: str, row: Row) -> tuple[Conversation, str, str] | str:
    _need(where, row, ("chosen", "rejected"))
    if row.get("prompt") is not None:
        p = row["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(where, "prompt", p)
        return prompt, _answer(where, "chosen", row["chosen"], prompt), _answer(where, "rejected", row["rejected"], prompt)
    # Implicit prompt: chosen and rejected are whole conversations sharing all but the last turn.
    if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
        raise PreferenceDataError(f"{where}: missing field 'prompt' (string answers need a prompt column)")
    c, r = _messages(where, "chosen", row["chosen"]), _messages(where, "rejected", row["rejected"])
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise PreferenceDataError(f"{where}: 'chosen' and 'rejected' must end with an assistant message")
    if c[:-1] != r[:-1]:
        return "mismatched_history"
    return c[:-1], c[-1]["content"], r[-1]["content"]


def _is_hh(row: Row, fmt: str) -> bool:
    if fmt == "hh":
        return True
    if fmt == "preference":
        return False
    # auto / datasets: no prompt column and transcript strings in chosen/rejected
    return row.get("prompt") is None and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)


def pair_of(where: str, row: Row, fmt: str) -> tuple[Conversation, str, str] | str:
    """(prompt messages, chosen text, rejected text) of a row, or the reason the pair is skipped."""
    parsed = _from_hh(where, row) if _is_hh(row, fmt) else _from_preference(where, row)
    if isinstance(parsed, str):
        return parsed
    prompt, chosen, rejected = parsed
    if not prompt or prompt[-1]["role"] != "user":
        raise PreferenceDataError(f"{where}: 'prompt' must end with a user message")
    if not prompt[-1]["content"].strip():
        raise PreferenceDataError(f"{where}: 'prompt' has an empty user message")
    if chosen.strip() == rejected.strip():
        return "identical"
    return prompt, chosen, rejected


def read_pairs(src: PairSource, skipped: Counter[str] | None = None) -> list[Row]:
    """Human preference rows (records.py "Preference rows") from one source, in source order.

    Pairs that are not a comparison are left out and counted by reason in `skipped` when given:
    `mismatched_history` (the two transcripts differ before the last answer), `identical` (both
    answers the same), `duplicate` (the same pair again). `limit` keeps the first N pairs read.
    """
    out: list[Row] = []
    if src.limit == 0:
        return out
    skipped = skipped if skipped is not None else Counter()
    seen: set[str] = set()
    for where, row in source_rows(src):
        parsed = pair_of(where, row, src.format)
        if isinstance(parsed, str):
            skipped[parsed] += 1
            continue
        prompt, chosen, rejected = parsed
        text = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True)
        rid = row["id"] if isinstance(row.get("id"), str) and row["id"] else record_id_for(src.path, text)
        if rid in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(rid)
        out.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "p_chosen": 1.0,
            "label_source": "human",
            "record_id": rid,
            "source": src.path,
        })
        if src.limit is not None and len(out) >= src.limit:
            break
    return out


def read_all_pairs(sources: Sequence[PairSource], skipped: Counter[str] | None = None) -> list[Row]:
    """The rows of `read_pairs` for every source in order; a record id used twice is an error."""
    return _one_owner(sources, lambda src: read_pairs(src, skipped), PreferenceDataError)


# ---- comparisons with a known answer (evaluation) ---------------------------------------------

FORMATS = ("hh", "hhh", "paper", "preference")


@dataclass(frozen=True)
class Item:
    """A comparison with a known answer: `responses[correct]` is the better reply to `conversation`
    (which ends with the human's turn)."""

    id: str
    conversation: tuple[Message, ...]
    responses: tuple[str, str]
    correct: int
    where: str
    category: str | None = None


@dataclass(frozen=True)
class RenderedItem:
    """A pre-rendered multiple-choice question: the answer strings are scored after the prompt."""

    id: str
    prompt: str
    corrects: tuple[str, ...]
    incorrects: tuple[str, ...]
    where: str


@dataclass
class Source:
    """The items read from one file, with the counts of those skipped by reason."""

    path: str
    format: str
    items: list[Any]
    skipped: dict[str, int] = field(default_factory=dict)


def correct_slot(seed: int, item_id: str) -> int:
    """Which slot (0 or 1) shows the better response: a seeded hash of the id, so it is the same on
    every run with this seed and independent of file order and batching."""
    return stable_seed(seed, "eval-slot", item_id) & 1


def _unique(ids: Counter[str], base: str) -> str:
    """`base`, or `base#k` for its k-th repeat in the same file (duplicate rows keep distinct ids)."""
    ids[base] += 1
    return base if ids[base] == 1 else f"{base}#{ids[base] - 1}"


def read_hh(path: str | Path, seed: int = 0, limit: int | None = None) -> Source:
    """hh-rlhf pairs as comparisons; the first `limit` usable pairs."""
    path = Path(path)
    out = Source(str(path), "hh", [])
    skipped: Counter[str] = Counter()
    ids: Counter[str] = Counter()
    for where, row in file_rows(path, "jsonl", EvalInputError):
        if limit is not None and len(out.items) >= limit:
            break
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise EvalInputError(f"{where}: an hh-rlhf row needs 'chosen' and 'rejected' strings")
        pair = hh_pair(chosen, rejected)
        if pair is None:
            skipped["no_shared_history"] += 1
            continue
        conv, good, bad = pair
        if good.strip() == bad.strip():
            skipped["identical"] += 1
            continue
        iid = _unique(ids, record_id_for("hh", f"{chosen}\0{rejected}"))
        slot = correct_slot(seed, iid)
        responses = (good, bad) if slot == 0 else (bad, good)
        out.items.append(Item(iid, tuple(conv), responses, slot, where))
    out.skipped = dict(skipped)
    return out


def hhh_conversation(text: str) -> list[Message]:
    """A BIG-bench HHH input as chat turns: a `Human:`/`Assistant:` dialogue ending with the human
    becomes its turns; anything else is one human turn."""
    if text.lstrip().startswith("Human:"):
        turns = parse_hh(text)
        if turns and turns[-1]["role"] == "user" and all(t["content"] for t in turns):
            return turns
    return [{"role": "user", "content": text.strip()}]


def _task_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("task.json") if p.is_file())


def _json(path: Path) -> Any:
    """A whole JSON document (gzipped or not); errors name the file and, for bad JSON, the line."""
    text = "".join(line for _, line in _all_lines(path, EvalInputError))
    return _parse_json(text, str(path), EvalInputError, document=True)


def _task_examples(path: Path) -> Rows:
    """(where, example) for every example of a BIG-bench task file."""
    data = _json(path)
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list):
        raise EvalInputError(f"{path}: a BIG-bench task file needs an 'examples' list")
    return ((f"{path}: examples[{i}]", ex) for i, ex in enumerate(examples))


def read_hhh(path: str | Path, seed: int = 0, limit: int | None = None) -> Source:
    """One BIG-bench task file (two options per example) as comparisons; the first `limit` examples."""
    path = Path(path)
    examples = _task_examples(path)
    out = Source(str(path), "hhh", [])
    ids: Counter[str] = Counter()
    for where, ex in examples:
        if limit is not None and len(out.items) >= limit:
            break
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not ex["input"].strip():
            raise EvalInputError(f"{where}: needs a non-empty 'input' string")
        scores = ex.get("target_scores")
        if not isinstance(scores, dict) or len(scores) != 2:
            got = len(scores) if isinstance(scores, dict) else type(scores).__name__
            raise EvalInputError(f"{where}: 'target_scores' must map exactly two options to scores, got {got}")
        (a, sa), (b, sb) = scores.items()
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in (sa, sb)) or sa == sb:
            raise EvalInputError(f"{where}: the two target scores must be different numbers, got {sa!r} and {sb!r}")
        if not a.strip() or not b.strip():
            raise EvalInputError(f"{where}: an option is empty")
        good, bad = (a, b) if sa > sb else (b, a)
        iid = _unique(ids, record_id_for("hhh", f"{ex['input']}\0{good}\0{bad}"))
        slot = correct_slot(seed, iid)
        responses = (good.strip(), bad.strip()) if slot == 0 else (bad.strip(), good.strip())
        out.items.append(Item(iid, tuple(hhh_conversation(ex["input"])), responses, slot, where))
    return out


def read_preference(path: str | Path, seed: int = 0, limit: int | None = None) -> Source:
    """Rows `{"prompt", "chosen", "rejected"}` (TRL's preference layout: a prompt string or messages,
    answers as strings or one assistant message; an optional `id` and `category`) as comparisons,
    `chosen` being the better reply; the first `limit` usable pairs. `builtin:NAME` reads a shipped
    pair set. Pairs whose two answers are the same, or whose conversations differ before the last
    answer, are skipped and counted, as are rows with neither `chosen` nor `rejected` (the flag
    cases of a `cai constitution test` cases file, whose pair cases are read)."""
    path_s = str(path)
    file = shipped(path_s.split(":", 1)[1], "pair", EvalInputError) if path_s.startswith("builtin:") else Path(path)
    out = Source(path_s, "preference", [])
    skipped: Counter[str] = Counter()
    ids: Counter[str] = Counter()
    for where, row in file_rows(file, "auto", EvalInputError):
        if limit is not None and len(out.items) >= limit:
            break
        if "chosen" not in row and "rejected" not in row:  # e.g. a flag case of a constitution's cases
            skipped["not_a_pair"] += 1
            continue
        try:
            parsed = pair_of(where, row, "preference")
        except PreferenceDataError as e:
            raise EvalInputError(str(e)) from None
        if isinstance(parsed, str):
            skipped[parsed] += 1
            continue
        conv, good, bad = parsed
        cat = row.get("category")
        if cat is not None and (not isinstance(cat, str) or not cat.strip()):
            raise EvalInputError(f"{where}: 'category' must be a non-empty string, got {cat!r}")
        given = row.get("id")
        base = given if isinstance(given, str) and given.strip() else record_id_for(
            "preference", json.dumps([conv, good, bad], ensure_ascii=False, sort_keys=True))
        iid = _unique(ids, base)
        slot = correct_slot(seed, iid)
        responses = (good, bad) if slot == 0 else (bad, good)
        out.items.append(Item(iid, tuple(conv), responses, slot, where, cat.strip() if cat else None))
    out.skipped = dict(skipped)
    return out


def read_paper(path: str | Path, limit: int | None = None) -> Source:
    """Pre-rendered questions with their correct and incorrect answer strings; the first `limit`."""
    path = Path(path)
    out = Source(str(path), "paper", [])
    ids: Counter[str] = Counter()
    for where, row in file_rows(path, "jsonl", EvalInputError):
        if limit is not None and len(out.items) >= limit:
            break
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise EvalInputError(f"{where}: needs a non-empty 'prompt' string")
        lists = {}
        for key in ("corrects", "incorrects"):
            v = row.get(key)
            if not (isinstance(v, list) and v and all(isinstance(o, str) and o.strip() for o in v)):
                raise EvalInputError(f"{where}: '{key}' must be a non-empty list of non-empty strings")
            lists[key] = tuple(v)
        if set(lists["corrects"]) & set(lists["incorrects"]):
            raise EvalInputError(f"{where}: an option is listed as both correct and incorrect")
        iid = _unique(ids, record_id_for("paper", prompt))
        out.items.append(RenderedItem(iid, prompt, lists["corrects"], lists["incorrects"], where))
    return out


def detect_format(path: str | Path) -> str:
    """`hh`, `hhh` or `paper`, from the file's content (a directory holds `hhh` task files)."""
    path = Path(path)
    if path.is_dir():
        return "hhh"
    first = next((line for _, line in _lines(path, EvalInputError)), None)
    if first is None:
        raise EvalInputError(f"{path}: the file is empty")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        row = None  # not one object per line: a pretty-printed JSON document, perhaps a task file
    if isinstance(row, dict):
        if "examples" in row:
            return "hhh"
        if "chosen" in row and "rejected" in row:
            return "preference" if "prompt" in row else "hh"
        if "prompt" in row and ("corrects" in row or "incorrects" in row):
            return "paper"
    elif first.lstrip().startswith("{"):
        return "hhh"  # read_hhh reports it if it is not a task file after all
    raise EvalInputError(f"{path}: cannot tell the format (expected hh-rlhf rows with chosen/rejected, rows with "
                         f"prompt/chosen/rejected, a BIG-bench task JSON with examples, or rows with "
                         f"prompt/corrects/incorrects); pass --format")


def read_items(path: str | Path, fmt: str = "auto", seed: int = 0, limit: int | None = None) -> list[Source]:
    """The items of one path, in format `fmt` (`auto` detects it). A directory gives one source per
    BIG-bench task file under it that has examples; `limit` applies to each source."""
    if fmt not in ("auto", *FORMATS):
        raise EvalInputError(f"{path}: unknown format '{fmt}' (use auto, {', '.join(FORMATS)})")
    if str(path).startswith("builtin:"):
        if fmt not in ("auto", "preference"):
            raise EvalInputError(f"{path}: a shipped set is read as format preference, not {fmt}")
        return [read_preference(path, seed, limit)]
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"{path}: no such file or directory")
    if fmt == "auto":
        fmt = detect_format(path)
    if path.is_dir():
        if fmt != "hhh":
            raise EvalInputError(f"{path}: a directory can only hold BIG-bench task files (format hhh)")
        found = []
        for task in _task_files(path):
            data = _json(task)
            # The parent task of a task with subtasks lists them but has no examples of its own.
            if isinstance(data, dict) and "examples" in data:
                found.append(read_hhh(task, seed, limit))
        if not found:
            raise EvalInputError(f"{path}: no task.json with 'examples' under this directory")
        return found
    if fmt == "hh":
        return [read_hh(path, seed, limit)]
    if fmt == "hhh":
        return [read_hhh(path, seed, limit)]
    if fmt == "preference":
        return [read_preference(path, seed, limit)]
    return [read_paper(path, limit)]

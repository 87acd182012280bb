"""Where training rows come from: a dataset file, a `Dataset.save_to_disk` folder, a Hub dataset or a builtin one,
read through the `datasets` library, with the file (and line) named when it cannot be read.

Files are read by datasets' packaged builders (`json`, `parquet`, `csv`, `arrow`, `text`), which convert them to
Arrow in datasets' cache (`HF_DATASETS_CACHE`, default `~/.cache/huggingface/datasets`), never next to the data;
a `save_to_disk` folder is memory-mapped by `load_from_disk` and only read. A Hub dataset id is downloaded by
`load_dataset` from `HF_ENDPOINT` (read by datasets at import) with `HF_TOKEN`. No `.map`/`.filter` is ever run
on a loaded dataset: on a `load_from_disk` dataset they would write cache files into the user's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

from adapterflow.model_references import BUILTIN_PREFIX, DATA_SUFFIXES, is_hub_dataset_id

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
            ".txt": "text"}  # file suffix -> datasets' packaged builder
if set(BUILDERS) != set(DATA_SUFFIXES):  # one list of accepted suffixes, owned by model_references
    raise ImportError("data_sources.BUILDERS and model_references.DATA_SUFFIXES disagree")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what Dataset(Dict).save_to_disk writes into its folder
FORMATS_HINT = ".jsonl/.json, .parquet, .csv, .arrow, .txt, a Dataset.save_to_disk folder or a Hub dataset id"


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file (and line or row), the parameter and the fix."""


class UnknownSplitError(DatasetError):
    """The dataset has no split `split` (`available` lists those it has); `for_parameter` words the same error
    for the parameter that named the split (dataset.split, or evaluate.split for the evaluation dataset)."""

    def __init__(self, split: str, name: str, available: list[str], parameter: str = "dataset.split") -> None:
        self.split, self.name, self.available = split, name, available
        super().__init__(f"{parameter}={split!r}: {name} has no split {split!r}; available: {available}.")

    def for_parameter(self, parameter: str) -> "UnknownSplitError":
        return UnknownSplitError(self.split, self.name, self.available, parameter)


@dataclass(frozen=True)
class Table:
    """The rows of one split, as datasets read them.

    Attributes:
        rows: a `datasets.Dataset` (indexable, `column_names`, `len`).
        name: how messages name the source: the file or folder path, or the Hub dataset id.
        where: row index (0-based) -> "line N" (jsonl/txt: the line in the file) or "row N" (1-based).
        lines_of_text: a .txt file: every line is a row, blank ones to be skipped.
    """

    rows: object
    name: str
    where: Callable[[int], str]
    lines_of_text: bool = False


Kind = Literal["builtin", "file", "folder", "hub"]


def classify(path: str) -> tuple[Kind, str]:
    """(kind, location) of a `dataset.path` value: a builtin name's file, a local file or folder, or a Hub id.

    Raises:
        DatasetError: an unknown builtin name (the available ones listed).
    """
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        file = BUILTIN_DIR / f"{name}.jsonl"
        if not file.is_file():
            available = sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))
            raise DatasetError(f"Unknown builtin dataset {name!r}; available: {available}.")
        return "builtin", str(file)
    if is_hub_dataset_id(path):
        return "hub", path
    return ("folder" if Path(path).is_dir() else "file"), path


def read_split(path: str, split: str = "train", revision: Optional[str] = None) -> Table:
    """The rows of `split` of the dataset `path` names (`revision`: a Hub dataset's branch, tag or commit).

    Raises:
        FileNotFoundError: the file does not exist, or the Hub dataset cannot be downloaded.
        DatasetError: an unsupported extension, a folder not written by save_to_disk, unreadable or malformed
            content (the first bad line named for .jsonl/.txt), an unknown split (the available ones listed).
    """
    kind, location = classify(path)
    with _quiet():
        if kind == "hub":
            splits, table = _hub(location, revision), Table(None, location, _row)
        elif kind == "folder":
            splits, table = _saved_folder(Path(location)), Table(None, location, _row)
        else:
            splits, table = _file(Path(location))
    if split not in splits:
        raise UnknownSplitError(split, table.name, sorted(splits))
    return Table(splits[split], table.name, table.where, table.lines_of_text)


def _file(file: Path) -> tuple[dict, Table]:
    import datasets

    if not file.is_file():
        raise FileNotFoundError(f"Dataset {file} not found; pass a file ({FORMATS_HINT}), or builtin:instructions.")
    builder = BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise DatasetError(f"Dataset {file} has extension {file.suffix!r}; use {FORMATS_HINT}.")
    try:
        splits = datasets.load_dataset(builder, data_files=str(file))
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many kinds; say what is wrong with the file
        raise DatasetError(_diagnose(file, builder, exc)) from None
    if builder == "text":  # the text builder yields every line, blank ones too
        return splits, Table(None, str(file), lambda i: f"line {i + 1}", lines_of_text=True)
    if file.suffix.lower() == ".jsonl":
        lines = [n for n, text in _lines(file) if text.strip()]  # pyarrow skips blank lines
        return splits, Table(None, str(file), lambda i: f"line {lines[i]}" if i < len(lines) else _row(i))
    return splits, Table(None, str(file), _row)


def _saved_folder(folder: Path) -> dict:
    import datasets

    if not any((folder / marker).is_file() for marker in SAVED_MARKERS):
        raise DatasetError(f"Dataset {folder} is a folder but not one written by Dataset.save_to_disk (no "
                           f"{' or '.join(SAVED_MARKERS)} in it); pass a file ({FORMATS_HINT}).")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"Dataset folder {folder} cannot be read by datasets.load_from_disk "
                           f"({_reason(exc)}); save it again with save_to_disk.") from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _hub(repo_id: str, revision: Optional[str] = None) -> dict:
    import datasets

    try:
        return dict(datasets.load_dataset(repo_id, revision=revision))
    except Exception as exc:  # noqa: BLE001 - any failure means: not available from this endpoint
        raise FileNotFoundError(
            f"Hub dataset {repo_id!r} could not be loaded from {datasets.config.HF_ENDPOINT} ({_reason(exc)}); check "
            f"the id, HF_ENDPOINT and HF_TOKEN, or download it and pass the local file or folder.") from None


def hub_commit(repo_id: str, revision: Optional[str] = None) -> str:
    """The commit sha a Hub dataset's `revision` (default: main) points to now, so a run reads one fixed version.

    Raises:
        FileNotFoundError: the dataset or the revision cannot be found at HF_ENDPOINT.
    """
    import datasets
    from huggingface_hub import HfApi

    try:
        return HfApi(endpoint=datasets.config.HF_ENDPOINT).dataset_info(repo_id, revision=revision).sha
    except Exception as exc:  # noqa: BLE001 - not found, no access, no network: the dataset cannot be read
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"Hub dataset {repo_id!r}{at} could not be found at {datasets.config.HF_ENDPOINT} ({_reason(exc)}); "
            f"check the id, dataset.revision, HF_ENDPOINT and HF_TOKEN, or download it and pass the local file or "
            f"folder.") from None


def fingerprint(path: str, revision: Optional[str] = None) -> str:
    """A sha256 (hex) that is the same for the same data and changes when one byte does.

    Files (and builtin datasets): the sha256 of the file's bytes. `save_to_disk` folders: the sha256 of every
    file's relative path and sha256, sorted. Hub datasets: the sha256 of `<repo id>@<commit sha>` of `revision`
    (default: main) on the Hub now (a commit changes whenever a byte of any file does).
    """
    kind, location = classify(path)
    if kind == "hub":
        return hashlib.sha256(f"{location}@{hub_commit(location, revision)}".encode()).hexdigest()
    root = Path(location)
    if root.is_file():
        return _sha256(root)
    listing = "".join(f"{p.relative_to(root).as_posix()}\0{_sha256(p)}\n"
                      for p in sorted(root.rglob("*")) if p.is_file())
    return hashlib.sha256(listing.encode()).hexdigest()


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _diagnose(file: Path, builder: str, exc: Exception) -> str:
    """Why datasets could not read `file`: the first non-UTF-8 or non-JSON line for line formats, else its reason."""
    if builder in ("json", "text"):
        try:
            lines = _lines(file)
        except DatasetError as error:
            return str(error)
        if not any(text.strip() for _, text in lines):
            return f"Dataset {file} holds no examples; add lines with text, or prompt/completion records."
        if file.suffix.lower() == ".jsonl":
            for number, text in lines:
                if text.strip():
                    try:
                        json.loads(text)
                    except json.JSONDecodeError as error:
                        return f"Dataset {file}, line {number}: not JSON ({error.msg}); fix or remove that line."
        elif builder == "json":
            try:
                json.loads("\n".join(text for _, text in lines))
            except json.JSONDecodeError as error:
                return f"Dataset {file}, line {error.lineno}: not JSON ({error.msg}); fix the file."
    if "corresponds to no data" in str(exc):  # datasets' wording for a file without rows (e.g. a header only)
        return f"Dataset {file} holds no examples (no data rows); add rows to it."
    return f"Dataset {file} cannot be read as {builder} ({_reason(exc)}); check that the file is a valid {builder} file."


def _lines(file: Path) -> list[tuple[int, str]]:
    """(line number, text) for every line of a UTF-8 file, whatever the locale's encoding.

    Raises:
        DatasetError: the file is not UTF-8 (the line and column of the first bad byte named).
    """
    lines = []
    for number, raw in enumerate(file.read_bytes().splitlines(), start=1):
        try:
            lines.append((number, raw.decode("utf-8-sig")))  # -sig: a leading BOM is not text
        except UnicodeDecodeError as exc:
            raise DatasetError(f"Dataset {file}, line {number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                               f"column {exc.start + 1}); save the file as UTF-8.") from None
    return lines


def _row(index: int) -> str:
    return f"row {index + 1}"


def _reason(exc: BaseException) -> str:
    """The innermost cause's first line, e.g. `ArrowInvalid: JSON parse error: ...`."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No datasets progress bars ("Generating train split") or logged errors: problems become one DatasetError."""
    from datasets.utils.logging import get_verbosity, set_verbosity
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars, level = not are_progress_bars_disabled(), get_verbosity()
    disable_progress_bars()
    set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        set_verbosity(level)
        if bars:
            enable_progress_bars()

"""Reading users' tables (CSV / Parquet / JSONL) with one clear error per problem."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import SlimcartError


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV, TSV, Parquet or JSON-lines file into a DataFrame."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        elif suffix in (".jsonl", ".json", ".ndjson"):
            df = pd.read_json(path, lines=suffix != ".json")
        else:
            raise SlimcartError(f"unsupported data file type '{suffix}' for {path} (use .csv, .tsv, .parquet or .jsonl)")
    except SlimcartError:
        raise
    except pd.errors.EmptyDataError:
        raise SlimcartError(f"data file {path} is empty") from None
    except Exception as e:
        raise SlimcartError(f"cannot read data file {path}: {str(e).splitlines()[0]}") from None
    if df.empty:
        raise SlimcartError(f"data file {path} has no rows")
    return df


def require_columns(df: pd.DataFrame, path: Path, alternatives: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Map each logical column to the first present alternative name; error naming what is missing."""
    found, missing = {}, []
    lower = {str(c).lower(): c for c in df.columns}  # a headerless file has integer column labels
    for logical, names in alternatives.items():
        hit = next((lower[n] for n in names if n in lower), None)
        if hit is None:
            missing.append(f"{logical} (one of: {', '.join(names)})")
        else:
            found[logical] = hit
    if missing:
        raise SlimcartError(f"data file {path} is missing column(s): {'; '.join(missing)}; it has: {', '.join(map(str, df.columns))}")
    return found


def model_folder(spec: str, aliases: str) -> Path:
    """A model spec that is not an alias: an existing folder, else one error naming the aliases."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise SlimcartError(f"unknown model '{spec}': not the alias {aliases} and no such folder")
    return folder


def load_checkpoint(folder: Path, loader, what: str):
    """`loader(folder)` on a folder holding config.json + model.safetensors; anything wrong inside it
    (corrupt JSON or safetensors, shape mismatch) is one line for the user, not a traceback."""
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        raise SlimcartError(f"model folder {folder} needs config.json and model.safetensors")
    try:
        return loader(folder)
    except Exception as e:  # noqa: BLE001 - every failure of an untrusted folder becomes one error line
        raise SlimcartError(f"cannot load {what} from {folder}: {str(e).splitlines()[0]}") from None

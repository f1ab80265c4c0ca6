"""Safe, versioned model files: tensors and plain containers only, read with ``weights_only=True``.

A checkpoint holds ``{"pertpy_gnn": {"format", "version", "kind"}, ...payload}``. Numpy arrays,
pandas objects and numpy scalars in the payload are encoded as tensors / lists / plain dicts
(:func:`encode`) so that :func:`torch.load` never needs to unpickle arbitrary classes (which can
run code), and decoded back on load. Reading checks the format: a file from a newer pertpy-gnn is
refused with the versions named; an older format is migrated where possible or refused by name; a
truncated or corrupt file raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

#: format of the files written by this version (bump on any incompatible change, and add a migration)
FORMAT_VERSION = 1
#: key of the header in a checkpoint
HEADER_KEY = "pertpy_gnn"


class CheckpointError(ValueError):
    """A model file cannot be read: truncated, corrupt, unsafe (a pickle), of another kind, or too new."""


def package_version() -> str:
    """The installed pertpy-gnn version (``0.0.0`` when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pertpy-gnn")
    except PackageNotFoundError:  # pragma: no cover
        return "0.0.0"


def encode(obj, where: str = "checkpoint"):
    """``obj`` with numpy / pandas values replaced by tensors, lists and tagged dicts (torch-safe)."""
    if isinstance(obj, torch.Tensor | str | bool | int | float | type(None)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biuf":
            return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj).copy()), "dtype": obj.dtype.str}
        if obj.dtype.kind in "OUS":
            return {
                "__strarray__": [None if v is None else str(v) for v in obj.ravel().tolist()],
                "shape": list(obj.shape),
            }
    if isinstance(obj, pd.DataFrame):
        return {
            "__dataframe__": {str(c): encode(obj[c].to_numpy(), where) for c in obj.columns},
            "columns": [str(c) for c in obj.columns],
            "index": encode(np.asarray(obj.index), where),
            "index_name": obj.index.name,
        }
    if isinstance(obj, pd.Series):
        return {
            "__series__": encode(obj.to_numpy(), where),
            "index": encode(obj.index, where),
            "name": None if obj.name is None else str(obj.name),
        }
    if isinstance(obj, pd.Index):
        return {"__index__": encode(np.asarray(obj), where), "name": obj.name}
    if isinstance(obj, dict):
        return {k: encode(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(encode(v, where) for v in obj)
    raise TypeError(
        f"Cannot save {where} of type {type(obj).__name__} safely (tensors, numpy arrays, pandas frames and "
        "plain containers only)."
    )


def decode(obj):
    """Inverse of :func:`encode`."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return obj["__ndarray__"].numpy().astype(np.dtype(obj["dtype"]), copy=False)
        if "__strarray__" in obj:
            return np.array(obj["__strarray__"], dtype=object).reshape(obj["shape"])
        if "__dataframe__" in obj:
            cols = obj["columns"]
            df = pd.DataFrame({c: decode(obj["__dataframe__"][c]) for c in cols}, columns=cols)
            df.index = pd.Index(decode(obj["index"]), name=obj["index_name"])
            return df
        if "__series__" in obj:
            return pd.Series(decode(obj["__series__"]), index=decode(obj["index"]), name=obj["name"])
        if "__index__" in obj:
            return pd.Index(decode(obj["__index__"]), name=obj["name"])
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(decode(v) for v in obj)
    return obj


def save_checkpoint(payload: dict, path: str | os.PathLike, *, kind: str) -> None:
    """Write ``payload`` (encoded) with a header naming ``kind``, the format and the package version."""
    header = {"format": FORMAT_VERSION, "version": package_version(), "kind": kind}
    torch.save({HEADER_KEY: header, **encode(payload)}, Path(path))


def read_torch_file(path: str | os.PathLike, *, map_location="cpu", what: str = "model file") -> dict:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {what} at {path}.")
    if not zipfile.is_zipfile(path):
        head = path.read_bytes()[:16]
        kind = (
            "a torch archive cut short"
            if head.startswith(b"PK")
            else f"not a torch archive; it begins with {head!r}"
        )
        raise CheckpointError(
            f"{path} ({path.stat().st_size} bytes) is not a readable {what}: it is truncated or corrupt ({kind}). "
            "Save the model again, or copy the file again from where it was written."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors and plain containers, so it is not read: unpickling "
            "them could run code. It was written by an older pertpy-gnn (before checkpoint format 1) or by "
            "another program. If you trust the file, load it once with `allow_pickle=True` and save it again "
            f"to get a safe file. ({str(err).splitlines()[0]})"
        ) from err
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as err:
        size = path.stat().st_size
        raise CheckpointError(
            f"{path} ({size} bytes) is not a readable {what}: it is truncated or corrupt "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}). Save the model "
            "again, or copy the file again from where it was written."
        ) from err


def check_header(ckpt: dict, path, *, kind: str) -> dict:
    """Check the header of a loaded checkpoint; return the decoded payload (header removed)."""
    header = ckpt.get(HEADER_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(header, dict) or "format" not in header:
        raise CheckpointError(
            f"{path} has no pertpy-gnn header: it was written by a pertpy-gnn older than checkpoint format 1 "
            "(or by another program). If you trust the file, load it with `allow_pickle=True` and save it "
            "again."
        )
    if header.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {header.get('kind')!r} model, not a {kind!r} model.")
    fmt = int(header["format"])
    if fmt > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by pertpy-gnn {header.get('version')} in checkpoint format {fmt}; this "
            f"pertpy-gnn ({package_version()}) reads formats up to {FORMAT_VERSION}. Upgrade pertpy-gnn "
            "(pip install -U pertpy-gnn) to read it."
        )
    # format 1 is the first versioned format: no migration yet (add them here, oldest first)
    return decode({k: v for k, v in ckpt.items() if k != HEADER_KEY})


def load_checkpoint(
    path: str | os.PathLike, *, kind: str, map_location="cpu", allow_pickle: bool = False
) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` safely; see the module docstring.

    ``allow_pickle=True`` reads an unversioned (pickled, pre-format-1) file from a trusted source.
    """
    if allow_pickle:
        try:
            ckpt = torch.load(Path(path), map_location=map_location, weights_only=False)
        except (EOFError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
            raise CheckpointError(
                f"{path} is not a readable model file: truncated or corrupt ({err})."
            ) from err
        if isinstance(ckpt, dict) and HEADER_KEY in ckpt:
            return check_header(ckpt, path, kind=kind)
        return ckpt
    return check_header(read_torch_file(path, map_location=map_location), path, kind=kind)


def save_model(
    model,
    dir_path,
    *,
    kind: str,
    prefix: str | None = None,
    overwrite: bool = False,
    save_anndata: bool = False,
    **anndata_write_kwargs,
) -> Path:
    """Save an scvi-tools model safely: its state dict, var names and ``*_`` attributes, with a header."""
    dir_path = Path(dir_path)
    if dir_path.exists() and not overwrite:
        raise ValueError(f"{dir_path} already exists; pass `overwrite=True` or choose another folder.")
    dir_path.mkdir(parents=True, exist_ok=True)
    prefix = prefix or ""
    if save_anndata:
        if model.adata is None:
            raise ValueError(f"This {kind} model holds no AnnData to save; drop `save_anndata=True`.")
        model.adata.write(dir_path / f"{prefix}adata.h5ad", **anndata_write_kwargs)
    attrs = {name: value for name, value in model._get_user_attributes() if name.endswith("_")}
    payload = {
        "model_state_dict": model.module.state_dict(),
        "var_names": np.asarray(model.get_var_names()).astype(str),
        "attr_dict": attrs,
    }
    path = dir_path / f"{prefix}model.pt"
    save_checkpoint(payload, path, kind=kind)
    return path


def saved_var_names(dir_path, *, kind: str, prefix: str | None = None) -> np.ndarray:
    """The genes (in order) of a model saved by :func:`save_model`, read safely."""
    ckpt = load_checkpoint(Path(dir_path) / f"{prefix or ''}model.pt", kind=kind)
    return np.asarray(ckpt["var_names"]).astype(str)


def load_model(
    cls,
    dir_path,
    adata=None,
    *,
    kind: str,
    uses_adata: bool,
    accelerator: str = "auto",
    device="auto",
    prefix: str | None = None,
    allow_pickle: bool = False,
):
    """Rebuild a model saved by :func:`save_model` (safely; see :func:`load_checkpoint`).

    ``uses_adata``: the model is set up on an AnnData (GEARS), which must then have the saved genes in
    the saved order; otherwise (GeneCompass) no AnnData is used.
    """
    from scvi.model._utils import parse_device_args
    from scvi.model.base._save_load import _initialize_model

    dir_path = Path(dir_path)
    prefix = prefix or ""
    path = dir_path / f"{prefix}model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"No saved model at {path} ({kind}.save writes [prefix]model.pt).")
    ckpt = load_checkpoint(path, kind=kind, allow_pickle=allow_pickle)
    try:
        attr_dict = dict(ckpt["attr_dict"])
        var_names = np.asarray(ckpt["var_names"]).astype(str)
        state = ckpt["model_state_dict"]
        registry = attr_dict.pop("registry_")
    except (KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path} lacks the model's {err} entry: it is not a {kind} model file."
        ) from err
    state.pop("pyro_param_store", None)  # written by scvi-tools' own save (files read with allow_pickle)
    if uses_adata:
        if adata is None:
            saved = dir_path / f"{prefix}adata.h5ad"
            if not saved.is_file():
                raise ValueError(
                    f"Give the AnnData to load the model onto: {dir_path} holds no saved AnnData "
                    "(save with save_anndata=True to keep one)."
                )
            import anndata

            adata = anndata.read_h5ad(saved)
        given = np.asarray(adata.var_names).astype(str)
        if not np.array_equal(given, var_names):
            same_set = len(given) == len(var_names) and set(given) == set(var_names)
            detail = (
                "the same genes, reordered"
                if same_set
                else f"{len(given)} genes given, {len(var_names)} in the model, "
                f"{len(set(var_names) - set(given))} of the model's missing"
            )
            raise ValueError(
                f"adata.var_names are not the model's genes in the model's order ({detail}). Reorder / subset "
                f"adata first: `adata = adata[:, {cls.__name__}.saved_var_names({str(dir_path)!r})].copy()` "
                f"(the model's genes begin {[str(g) for g in var_names[:3]]}). The graphs are saved with the model: "
                "recomputing them does not help."
            )
        cls.setup_anndata(adata, source_registry=registry, **registry["setup_args"])
    else:
        adata = None
    model = _initialize_model(cls, adata, registry, attr_dict, None)
    model.module.load_state_dict(state)
    _, _, dev = parse_device_args(
        accelerator=accelerator, devices=device, return_device="torch", validate_single_device=True
    )
    model.to_device(dev)
    model.module.eval()
    return model

"""Download public perturbation screens with pooch: caching, retries, checksums and clear errors."""

from __future__ import annotations

import os
from pathlib import Path

from anndata import AnnData

#: environment variable that sets the download cache folder
CACHE_ENV = "PERTPY_GNN_CACHE"

#: the public screens, as hosted for pertpy (``pt.dt.*``): figshare for the scverse-processed files,
#: Zenodo record 7278143 for the scPerturb-harmonized files. No checksum of these files was found
#: published anywhere we could check (the hosts compute one per upload but no source we could read
#: lists them), so none is invented here: ``known_hash`` is None and every download is instead
#: validated right after it arrives (:func:`validate_h5ad`: an HDF5 file with the groups of an h5ad);
#: an invalid file is deleted from the cache. Pass ``known_hash=`` to pin a copy you trust.
DATASETS: dict[str, dict[str, str | None]] = {
    "norman_2019": {
        "fname": "norman_2019.h5ad",
        "url": "https://figshare.com/ndownloader/files/34027562",
        "known_hash": None,
    },
    "adamson_2016": {
        "fname": "adamson_2016_upr_perturb_seq.h5ad",
        "url": "https://zenodo.org/record/7278143/files/AdamsonWeissman2016_GSM2406681_10X010.h5ad?download=1",
        "known_hash": None,
    },
    "dixit_2016": {
        "fname": "dixit_2016.h5ad",
        "url": "https://figshare.com/ndownloader/files/34014608",
        "known_hash": None,
    },
    "replogle_2022_k562_essential": {
        "fname": "replogle_2022_k562_essential.h5ad",
        "url": "https://zenodo.org/record/7278143/files/ReplogleWeissman2022_K562_essential.h5ad?download=1",
        "known_hash": None,
    },
}


class DownloadError(ConnectionError):
    """A remote file could not be downloaded (host unreachable, HTTP error, timeout).

    A subclass of :class:`ConnectionError` (and so of :class:`OSError`); the message says which URL to
    download by hand and what to pass instead.
    """


class ChecksumError(ValueError):
    """A downloaded file does not match its known checksum (``known_hash``)."""


class InvalidDownloadError(ValueError):
    """A downloaded (or cached) file is not what was expected, e.g. an HTML error page instead of an h5ad."""


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def describe_bytes(head: bytes, size: int) -> str:
    """What a file that begins with ``head`` looks like, in words (for error messages)."""
    text = head.lstrip().lower()
    if size == 0:
        return "an empty file"
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:512]:
        return f"an HTML page ({size} bytes; the server probably answered with an error or a login page)"
    if text.startswith((b"{", b"[")):
        return f"a JSON document ({size} bytes): {head[:120].decode('utf-8', 'replace')!r}"
    if text.startswith(b"<?xml"):
        return f"an XML document ({size} bytes): {head[:120].decode('utf-8', 'replace')!r}"
    if head.startswith(b"\x1f\x8b"):
        return f"a gzip archive ({size} bytes)"
    if head.startswith(b"PK"):
        return f"a zip archive ({size} bytes)"
    return f"{size} bytes beginning with {head[:32]!r}"


def validate_gaf_gz(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a gzipped GO annotation file (GAF), or ``None`` if it is."""
    import gzip

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if not head.startswith(b"\x1f\x8b"):
        return f"it is {describe_bytes(head, size)}, not a gzipped GAF file"
    try:
        with gzip.open(path, "rb") as fh:
            first = fh.read(64)
    except (OSError, EOFError) as err:
        return f"it is a damaged gzip file ({size} bytes; {err}), e.g. a partial download"
    if not first.startswith(b"!gaf-version"):
        return f"it is a gzip file whose text begins with {first[:32]!r}, not a GAF header ('!gaf-version')"
    return None


def validate_h5ad(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a readable h5ad (an HDF5 file with ``X``, ``obs`` and ``var``), or ``None`` if it is."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if not head.startswith(_HDF5_SIGNATURE):
        return f"it is {describe_bytes(head, size)}, not an HDF5 (h5ad) file"
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("X", "obs", "var") if k not in f]
    except OSError as err:
        return f"it is a damaged HDF5 file ({size} bytes; {err}), e.g. a partial download"
    if missing:
        return f"it is an HDF5 file without the h5ad groups {missing}"
    return None


def get_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder where downloads are cached.

    The first that is set of: ``cache_dir``, the environment variable ``PERTPY_GNN_CACHE``, and
    ``pooch.os_cache('pertpy-gnn')`` (e.g. ``~/.cache/pertpy-gnn`` on Linux).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("pertpy-gnn"))


def fetch(
    fname: str,
    url: str,
    *,
    known_hash: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    retries: int = 2,
    timeout: float = 60.0,
    progress_bar: bool = True,
    manual_hint: str | None = None,
    validate=None,
) -> Path:
    """Return the local path of ``fname``, downloading it from ``url`` into the cache when absent.

    Parameters
    ----------
    fname
        File name inside the cache folder.
    url
        Where to download it from (http or https).
    known_hash
        Checksum of the file (``"sha256:..."``, ``"md5:..."``, or a bare sha256); ``None`` skips the
        check. A cached copy that does not match is downloaded again.
    cache_dir
        Cache folder; see :func:`get_cache_dir`.
    retries
        Further attempts after a failed download (with a growing pause, as ``pooch``'s
        ``retry_if_failed``).
    timeout
        Seconds to wait for the server to answer.
    progress_bar
        Show a tqdm download progress bar.
    manual_hint
        Sentence appended to the error raised when the download fails, saying how to use a file
        downloaded by hand.
    validate
        Function ``path -> reason or None`` checking the file's format (e.g. :func:`validate_h5ad`). A
        cached copy that fails it is deleted and downloaded again; a fresh download that fails it is
        deleted and :class:`InvalidDownloadError` says what arrived and from which URL.

    Returns
    -------
    Path of the cached file. Nothing is downloaded when a (matching) copy is already there.

    Raises
    ------
    DownloadError
        When the host cannot be reached or answers with an error.
    ChecksumError
        When the downloaded file does not match ``known_hash``.
    InvalidDownloadError
        When the downloaded file fails ``validate``.
    """
    import pooch
    import requests

    folder = get_cache_dir(cache_dir)
    target = folder / fname
    if validate is not None and target.is_file():
        reason = validate(target)
        if reason is not None:
            from .._utils import logger

            logger.warning(
                "The cached %s is not valid (%s): deleting it and downloading it again.", target, reason
            )
            target.unlink()
    store = pooch.create(
        path=folder, base_url="", registry={fname: known_hash}, urls={fname: url}, retry_if_failed=retries
    )
    try:
        path = store.fetch(fname, downloader=pooch.HTTPDownloader(progressbar=progress_bar, timeout=timeout))
    except requests.exceptions.RequestException as err:
        hint = manual_hint or "then pass the downloaded file's path instead of calling the loader"
        raise DownloadError(
            f"Could not download {fname} from {url} ({type(err).__name__}: {err}). If this machine has no "
            f"internet access, download {url} by hand (e.g. `curl -L -o {fname} '{url}'`) and {hint}; or put "
            f"the file at {target} (choose another folder with `cache_dir=` or the {CACHE_ENV} environment "
            "variable) and call the loader again."
        ) from err
    except ValueError as err:
        if "hash" not in str(err).lower():
            raise
        raise ChecksumError(
            f"The file downloaded from {url} does not match its known checksum {known_hash!r} ({err}). "
            "The download was deleted. The host may serve a corrupted or updated file: try again, or pass "
            "`known_hash=None` (or the new checksum) if you trust the new file."
        ) from err
    if validate is not None:
        reason = validate(path)
        if reason is not None:
            Path(path).unlink()
            raise InvalidDownloadError(
                f"The file downloaded from {url} is not usable: {reason}. It was deleted from the cache "
                f"({target}). Check the URL in a browser; if the host is down or asks for a login, download the "
                f"file by hand and {manual_hint or 'pass its path instead of calling the loader'}."
            )
    return Path(path)


_LOADER_PARAMS = """
    Parameters
    ----------
    cache_dir
        Download cache folder; default: the ``PERTPY_GNN_CACHE`` environment variable, else
        ``pooch.os_cache('pertpy-gnn')``. A file already there is not downloaded again.
    backed
        ``'r'`` to read the matrix lazily from disk (see :func:`anndata.read_h5ad`).
    url
        Download from this address instead of the public one (a mirror, or a local server in tests).
    known_hash
        Checksum to verify (``"sha256:..."`` or ``"md5:..."``); ``None`` (the default: no checksum is
        published for this file) skips the check.
    retries
        Further download attempts after a failure.
    progress_bar
        Show a download progress bar.

    Returns
    -------
    The screen as an AnnData, unchanged from the file. Parse its perturbation column with
    :func:`pertpy_gnn.pp.parse_perturbations` (look at ``adata.obs`` for its name).

    Raises
    ------
    DownloadError
        When the host cannot be reached; the message names the URL to download by hand and how to read
        the file with :func:`pertpy_gnn.datasets.read_perturbation_h5ad`.
    ChecksumError
        When the download does not match ``known_hash``.
    InvalidDownloadError
        When the download is not an h5ad (e.g. an HTML page): the file is deleted from the cache and
        the message says what arrived and from which URL. A cached file that is not a valid h5ad is
        deleted and downloaded again.
"""


def _loader(name: str, doc: str):
    """Build the public loader of ``DATASETS[name]``: keyword-only options, ``doc`` + the shared docs."""
    entry = DATASETS[name]

    def load(
        *,
        cache_dir: str | os.PathLike | None = None,
        backed: str | None = None,
        url: str = entry["url"],
        known_hash: str | None = entry["known_hash"],
        retries: int = 2,
        progress_bar: bool = True,
    ) -> AnnData:
        from ._read import read_perturbation_h5ad

        path = fetch(
            str(DATASETS[name]["fname"]),
            url,
            known_hash=known_hash,
            cache_dir=cache_dir,
            retries=retries,
            progress_bar=progress_bar,
            manual_hint="read it with `pg.datasets.read_perturbation_h5ad(path, perturbation_key=...)`",
            validate=validate_h5ad,
        )
        return read_perturbation_h5ad(path, perturbation_key=None, backed=backed)

    load.__name__ = load.__qualname__ = name
    load.__doc__ = doc.rstrip() + "\n" + _LOADER_PARAMS
    return load


norman_2019 = _loader(
    "norman_2019",
    """Norman et al. 2019 CRISPRa Perturb-seq in K562 cells: single and paired gene activations.

    105 single genes and 131 gene pairs activated; the dataset GEARS evaluates combinatorial
    prediction and genetic interactions on. File: the scverse-processed copy used by
    ``pertpy.data.norman_2019`` (figshare 34027562).

    Norman, T. M. et al. Exploring genetic interaction manifolds constructed from rich single-cell
    phenotypes. Science 365, 786-793 (2019).
    """,
)

adamson_2016 = _loader(
    "adamson_2016",
    """Adamson et al. 2016 UPR Perturb-seq: CRISPRi of 82 genes in K562 cells (~65,000 cells).

    The single-gene knock-down screen GEARS uses for unseen single perturbations. File: the
    scPerturb-harmonized copy (Zenodo 7278143, ``AdamsonWeissman2016_GSM2406681_10X010.h5ad``), as
    ``pertpy.data.adamson_2016_upr_perturb_seq``.

    Adamson, B. et al. A multiplexed single-cell CRISPR screening platform enables systematic dissection
    of the unfolded protein response. Cell 167, 1867-1882 (2016).
    """,
)

dixit_2016 = _loader(
    "dixit_2016",
    """Dixit et al. 2016 Perturb-seq: pooled CRISPR knock-outs of transcription factors.

    File: the scverse-processed copy used by ``pertpy.data.dixit_2016`` (figshare 34014608).

    Dixit, A. et al. Perturb-Seq: dissecting molecular circuits with scalable single-cell RNA profiling
    of pooled genetic screens. Cell 167, 1853-1866 (2016).
    """,
)

replogle_2022_k562_essential = _loader(
    "replogle_2022_k562_essential",
    """Replogle et al. 2022 essential-scale CRISPRi Perturb-seq in K562 cells (day 7).

    About 2,000 common essential genes knocked down, one per cell; a large download (consider
    ``backed='r'``). File: the scPerturb-harmonized copy (Zenodo 7278143,
    ``ReplogleWeissman2022_K562_essential.h5ad``), as ``pertpy.data.replogle_2022_k562_essential``.

    Replogle, J. M. et al. Mapping information-rich genotype-phenotype landscapes with genome-scale
    Perturb-seq. Cell 185, 2559-2575 (2022).
    """,
)

"""Remote loaders against a real HTTP server on the loopback interface, and the h5ad reader."""

import gzip
import hashlib
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pooch
import pytest
import scipy.sparse as sp

import pertpy_gnn as pg
from pertpy_gnn.datasets._remote import DATASETS

LOADERS = {
    "norman_2019": pg.datasets.norman_2019,
    "adamson_2016": pg.datasets.adamson_2016,
    "dixit_2016": pg.datasets.dixit_2016,
    "replogle_2022_k562_essential": pg.datasets.replogle_2022_k562_essential,
}


class _Handler(SimpleHTTPRequestHandler):
    """Serves files from a folder; records every request; can fail the next n requests with 503."""

    def __init__(self, *args, state, **kwargs):
        self.state = state
        super().__init__(*args, **kwargs)

    def do_GET(self):
        self.state["requests"].append(self.path)
        if self.state["fail_next"] > 0:
            self.state["fail_next"] -= 1
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    state = {"requests": [], "fail_next": 0}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, state=state, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.update(root=root, url=f"http://127.0.0.1:{httpd.server_address[1]}")
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def screen(server):
    """A small perturbation screen served as /screen.h5ad; returns (adata, url, sha256)."""
    rng = np.random.default_rng(0)
    adata = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(1.0, size=(12, 6)).astype(np.float32)),
        obs=pd.DataFrame(
            {"condition": pd.Categorical(["control"] * 4 + ["A"] * 4 + ["A+B"] * 4)},
            index=[f"cell{i}" for i in range(12)],
        ),
        var=pd.DataFrame(index=[f"G{i}" for i in range(6)]),
    )
    path = server["root"] / "screen.h5ad"
    adata.write_h5ad(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return adata, f"{server['url']}/screen.h5ad", sha


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same(a: ad.AnnData, b: ad.AnnData) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert list(a.var_names) == list(b.var_names)


@pytest.mark.parametrize("name", list(LOADERS))
def test_download_verify_and_cache_hit(name, server, screen, tmp_path):
    adata, url, sha = screen
    cache = tmp_path / "cache"
    out = LOADERS[name](cache_dir=cache, url=url, known_hash=f"sha256:{sha}", retries=0, progress_bar=False)
    _assert_same(out, adata)
    assert (cache / DATASETS[name]["fname"]).is_file()
    assert server["requests"] == ["/screen.h5ad"]
    again = LOADERS[name](cache_dir=cache, url=url, known_hash=f"sha256:{sha}", retries=0, progress_bar=False)
    _assert_same(again, adata)
    assert len(server["requests"]) == 1  # second call: read from the cache, no request


def test_cache_dir_from_environment(server, screen, tmp_path, monkeypatch):
    adata, url, _ = screen
    monkeypatch.setenv("PERTPY_GNN_CACHE", str(tmp_path / "env_cache"))
    assert pg.datasets.get_cache_dir() == tmp_path / "env_cache"
    assert pg.datasets.get_cache_dir(tmp_path / "arg") == tmp_path / "arg"  # the argument wins
    out = pg.datasets.adamson_2016(url=url, retries=0, progress_bar=False)
    _assert_same(out, adata)
    assert (tmp_path / "env_cache" / "adamson_2016_upr_perturb_seq.h5ad").is_file()
    monkeypatch.delenv("PERTPY_GNN_CACHE")
    assert pg.datasets.get_cache_dir() == Path(pooch.os_cache("pertpy-gnn"))


def test_retry_after_server_error(server, screen, tmp_path):
    adata, url, sha = screen
    server["fail_next"] = 1
    out = pg.datasets.dixit_2016(
        cache_dir=tmp_path / "c", url=url, known_hash=f"sha256:{sha}", retries=1, progress_bar=False
    )
    _assert_same(out, adata)
    assert len(server["requests"]) == 2


def test_checksum_mismatch(server, screen, tmp_path):
    _, url, _ = screen
    cache = tmp_path / "c"
    with pytest.raises(pg.datasets.ChecksumError, match="does not match its known checksum"):
        pg.datasets.norman_2019(
            cache_dir=cache, url=url, known_hash="sha256:" + "0" * 64, retries=0, progress_bar=False
        )
    assert not (cache / "norman_2019.h5ad").exists()


def test_server_down_names_url_and_manual_path(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/norman.h5ad"
    cache = tmp_path / "c"
    with pytest.raises(pg.datasets.DownloadError) as info:
        pg.datasets.norman_2019(cache_dir=cache, url=url, retries=0, progress_bar=False)
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, OSError)
    msg = str(info.value)
    assert url in msg
    assert "read_perturbation_h5ad" in msg
    assert str(cache / "norman_2019.h5ad") in msg
    assert "cache_dir" in msg and "PERTPY_GNN_CACHE" in msg


def test_missing_file_on_server(server, tmp_path):
    with pytest.raises(pg.datasets.DownloadError, match="404"):
        pg.datasets.dixit_2016(
            cache_dir=tmp_path / "c", url=f"{server['url']}/nope.h5ad", retries=0, progress_bar=False
        )


def test_registered_urls_are_public():
    assert set(DATASETS) == set(LOADERS)
    assert len({d["fname"] for d in DATASETS.values()}) == len(DATASETS)
    for spec in DATASETS.values():
        assert spec["url"].startswith("https://")
        assert spec["fname"].endswith(".h5ad")


# -- GO annotations from the GO consortium's GAF, served over the loopback -----------------------

GAF = """!gaf-version: 2.2
!generated-by: test
UniProtKB\tP1\tKLF1\t\tGO:0000001\tPMID:1\tIDA\t\tF\tname\t\tprotein\ttaxon:9606\t20200101\tUniProt
UniProtKB\tP1\tKLF1\tinvolved_in\tGO:0000002\tPMID:1\tIEA\t\tP\tname\t\tprotein\ttaxon:9606\t20200101\tUniProt
UniProtKB\tP1\tKLF1\tNOT|involved_in\tGO:0000003\tPMID:1\tIMP\t\tP\tname\t\tprotein\ttaxon:9606\t20200101\tUniProt
UniProtKB\tP2\tMAPK1\tlocated_in\tGO:0000004\tPMID:2\tIBA\t\tC\tname\t\tprotein\ttaxon:9606\t20200101\tUniProt
UniProtKB\tP2\tMAPK1\tenables\tGO:0000001\tPMID:2\tIPI\tUniProtKB:P1\tF\tname\t\tprotein\ttaxon:9606\t20200101\tUniProt
UniProtKB\tP2\tMAPK1\tenables\tGO:0000001\tPMID:3\tIDA\t\tF\tname\t\tprotein\ttaxon:9606\t20200101\tUniProt
"""


def test_go_annotations_from_goa(server, tmp_path):
    (server["root"] / "goa_human.gaf.gz").write_bytes(gzip.compress(GAF.encode()))
    url = f"{server['url']}/goa_human.gaf.gz"
    kw = {"cache_dir": tmp_path / "c", "url": url, "retries": 0, "progress_bar": False}
    df = pg.datasets.go_annotations("goa", **kw)
    expected = pd.DataFrame(
        {
            "gene": ["KLF1", "KLF1", "MAPK1", "MAPK1"],
            "go_id": ["GO:0000001", "GO:0000002", "GO:0000001", "GO:0000004"],
        }
    )
    pd.testing.assert_frame_equal(df, expected)  # NOT dropped, duplicate pair merged
    assert (tmp_path / "c" / "goa_human.gaf.gz").is_file()
    mf = pg.datasets.go_annotations("goa", ontologies="MF", **kw)
    assert mf["go_id"].eq("GO:0000001").all() and len(mf) == 2
    exp = pg.datasets.go_annotations("goa", evidence="experimental", **kw)
    assert exp.values.tolist() == [["KLF1", "GO:0000001"], ["MAPK1", "GO:0000001"]]
    assert len(server["requests"]) == 1  # later calls read the cache
    # a file downloaded by hand gives the same table
    pd.testing.assert_frame_equal(pg.datasets.go_annotations(tmp_path / "c" / "goa_human.gaf.gz"), expected)


def test_go_annotations_goa_unreachable(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/goa_human.gaf.gz"
    with pytest.raises(pg.datasets.DownloadError, match=r"go_annotations\(source=path\)") as info:
        pg.datasets.go_annotations("goa", cache_dir=tmp_path, url=url, retries=0, progress_bar=False)
    assert url in str(info.value)


# -- reading a perturbation h5ad ---------------------------------------------------------------


def test_read_perturbation_h5ad_real_norman(shared_data):
    path = shared_data / "perturbation" / "norman2019_k562_subset.h5ad"
    adata = pg.datasets.read_perturbation_h5ad(path)
    ref = ad.read_h5ad(path)
    assert adata.shape == (3375, 500)
    np.testing.assert_array_equal(
        adata.X.toarray() if sp.issparse(adata.X) else adata.X,
        ref.X.toarray() if sp.issparse(ref.X) else ref.X,
    )
    assert adata.X.dtype == ref.X.dtype
    pd.testing.assert_frame_equal(adata.obs, ref.obs)
    pd.testing.assert_frame_equal(adata.var, ref.var)
    assert (adata.obs["condition"] == "control").sum() == 100
    backed = pg.datasets.read_perturbation_h5ad(path, backed="r")
    assert backed.isbacked and backed.shape == (3375, 500)
    backed.file.close()


def test_read_perturbation_h5ad_errors(screen, server, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pg.datasets.read_perturbation_h5ad(tmp_path / "missing.h5ad")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        pg.datasets.read_perturbation_h5ad(tmp_path)
    path = server["root"] / "screen.h5ad"
    with pytest.raises(KeyError, match=r"no obs column 'guide'.*\['condition'\].*perturbation_key="):
        pg.datasets.read_perturbation_h5ad(path, perturbation_key="guide")
    assert pg.datasets.read_perturbation_h5ad(path, perturbation_key=None).n_obs == 12


# -- every download is validated: what arrived, from where, deleted from the cache ------------------

HTML = b"<!DOCTYPE html><html><head><title>Log in</title></head><body>Please log in</body></html>"


@pytest.mark.parametrize("name", list(LOADERS))
def test_html_page_instead_of_h5ad_is_deleted_and_named(name, server, tmp_path):
    (server["root"] / "page.h5ad").write_bytes(HTML)
    url = f"{server['url']}/page.h5ad"
    cache = tmp_path / "c"
    with pytest.raises(pg.datasets.InvalidDownloadError) as info:
        LOADERS[name](cache_dir=cache, url=url, retries=0, progress_bar=False)
    msg = str(info.value)
    assert "an HTML page" in msg and url in msg and "deleted from the cache" in msg
    assert not (cache / DATASETS[name]["fname"]).exists()


@pytest.mark.parametrize(
    ("payload", "said"),
    [
        (b"", "an empty file"),
        (b'{"error": "not found"}', "a JSON document"),
        (b"\x89HDF\r\n\x1a\n" + b"\0" * 100, "a damaged HDF5 file"),
        (gzip.compress(b"abc"), "a gzip archive"),
    ],
)
def test_other_invalid_downloads_say_what_arrived(server, tmp_path, payload, said):
    (server["root"] / "bad.h5ad").write_bytes(payload)
    url = f"{server['url']}/bad.h5ad"
    with pytest.raises(pg.datasets.InvalidDownloadError, match=said):
        pg.datasets.dixit_2016(cache_dir=tmp_path / "c", url=url, retries=0, progress_bar=False)
    assert not (tmp_path / "c" / "dixit_2016.h5ad").exists()


def test_invalid_cached_file_is_replaced(server, screen, tmp_path):
    adata, url, _ = screen
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "norman_2019.h5ad").write_bytes(HTML)  # e.g. cached by an older version without validation
    out = pg.datasets.norman_2019(cache_dir=cache, url=url, retries=0, progress_bar=False)
    _assert_same(out, adata)
    assert server["requests"] == ["/screen.h5ad"]


def test_hdf5_without_h5ad_groups_is_refused(server, tmp_path):
    import h5py

    with h5py.File(server["root"] / "plain.h5", "w") as f:
        f["data"] = np.arange(3)
    with pytest.raises(
        pg.datasets.InvalidDownloadError, match=r"without the h5ad groups \['X', 'obs', 'var'\]"
    ):
        pg.datasets.adamson_2016(
            cache_dir=tmp_path / "c", url=f"{server['url']}/plain.h5", retries=0, progress_bar=False
        )


def test_goa_html_page_is_refused(server, tmp_path):
    (server["root"] / "goa_human.gaf.gz").write_bytes(HTML)
    with pytest.raises(pg.datasets.InvalidDownloadError, match="an HTML page") as info:
        pg.datasets.go_annotations(
            "goa",
            cache_dir=tmp_path / "c",
            url=f"{server['url']}/goa_human.gaf.gz",
            retries=0,
            progress_bar=False,
        )
    assert "go_annotations(source=path)" in str(info.value)
    assert not (tmp_path / "c" / "goa_human.gaf.gz").exists()

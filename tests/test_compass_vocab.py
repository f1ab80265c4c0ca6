import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import pertpy_gnn as pg
from pertpy_gnn._constants import COMPASS_TOKEN_KEY
from pertpy_gnn.pp._compass_vocab import CompassVocab

MGI_HEADER = (
    "DB Class Key\tCommon Organism Name\tNCBI Taxon ID\tSymbol\tEntrezGene ID\tMouse MGI ID\tHGNC ID\n"
)
MGI_ROWS = [
    ("1", "mouse, laboratory", "10090", "Actb"),
    ("1", "human", "9606", "ACTB"),
    ("2", "mouse, laboratory", "10090", "Gapdh"),
    ("2", "human", "9606", "GAPDH"),
    ("3", "mouse, laboratory", "10090", "Cd24a"),  # 1 mouse : 2 human -> not 1:1
    ("3", "human", "9606", "CD24"),
    ("3", "human", "9606", "CD24P4"),
    ("4", "mouse, laboratory", "10090", "Gm1"),  # mouse only
    ("5", "human", "9606", "TP53"),
    ("5", "mouse, laboratory", "10090", "Trp53"),
]


def write_mgi(path):
    text = MGI_HEADER + "".join("\t".join([*r, "1", "", ""]) + "\n" for r in MGI_ROWS)
    path.write_text(text)
    return path


@pytest.fixture
def vocab(tmp_path):
    return pg.pp.compass_vocab(
        pg.pp.mgi_orthologs(write_mgi(tmp_path / "hom.rpt")), human_genes=["MALAT1"], mouse_genes=["Xist"]
    )


@pytest.fixture
def loopback(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www (stopped after the test)."""
    www = tmp_path / "www"
    www.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_orthologs_and_vocab_layout(tmp_path, vocab):
    o = pg.pp.mgi_orthologs(write_mgi(tmp_path / "hom2.rpt"))
    assert set(o.columns) >= {"class_key", "species", "symbol", "one_to_one"}
    assert o.set_index("symbol")["one_to_one"].to_dict() == {
        "Actb": True,
        "ACTB": True,
        "Gapdh": True,
        "GAPDH": True,
        "Cd24a": False,
        "CD24": False,
        "CD24P4": False,
        "Gm1": False,
        "TP53": True,
        "Trp53": True,
    }
    assert list(vocab.tokens[:4]) == ["<pad>", "<mask>", "<human>", "<mouse>"]
    assert vocab.species_token("human") == 2 and vocab.species_token("mouse") == 3
    # human genes (incl. extra MALAT1), then mouse-specific genes (Cd24a, Gm1, Xist)
    assert list(vocab.tokens[4:]) == [
        "ACTB",
        "CD24",
        "CD24P4",
        "GAPDH",
        "MALAT1",
        "TP53",
        "mouse:Cd24a",
        "mouse:Gm1",
        "mouse:Xist",
    ]
    assert vocab.n_human == 6 and vocab.n_mouse_specific == 3
    # 1:1 orthologs share the human token, the others keep their own
    m = vocab.lookup(["Actb", "Trp53", "Cd24a", "Gm1", "Xist", "Nope"], "mouse")
    h = vocab.lookup(["ACTB", "tp53", "CD24", "NOPE"], "human")
    assert m[0] == h[0] and m[1] == h[1]
    assert vocab.tokens[m[2]] == "mouse:Cd24a" and m[2] != h[2]
    assert m[-1] == -1 and h[-1] == -1
    assert set(vocab.shared_ids) == {vocab.token_id("ACTB"), vocab.token_id("GAPDH"), vocab.token_id("TP53")}
    with pytest.raises(ValueError, match="species must be one of"):
        vocab.lookup(["ACTB"], "rat")


def test_vocab_roundtrip(tmp_path, vocab):
    vocab.write(tmp_path / "v.json")
    back = CompassVocab.read(tmp_path / "v.json")
    assert back == vocab and len(back) == len(vocab)
    assert np.array_equal(back.lookup(["Actb", "Gm1"], "mouse"), vocab.lookup(["Actb", "Gm1"], "mouse"))


def test_ensembl_ids_and_map_genes(tmp_path, vocab):
    table = pd.DataFrame(
        {"ensembl_gene_id": ["ENSG00000075624", "ENSG00000141510"], "symbol": ["ACTB", "TP53"]}
    )
    ids = vocab.lookup(
        ["ENSG00000075624.17", "ENSG00000141510", "ENSG00000999999", "GAPDH"], "human", gene_ids=table
    )
    assert list(vocab.tokens[ids[[0, 1, 3]]]) == ["ACTB", "TP53", "GAPDH"] and ids[2] == -1
    with pytest.raises(ValueError, match="Ensembl ids.*gene_ids="):
        vocab.lookup(["ENSG00000075624"], "human")
    adata = ad.AnnData(
        np.ones((2, 4), np.float32), var=pd.DataFrame(index=["Actb", "Gm1", "Trp53", "Unknown1"])
    )
    pg.pp.compass_map_genes(adata, vocab)  # species guessed: mouse (mixed case)
    rep = adata.uns[COMPASS_TOKEN_KEY]
    assert (
        rep["species"] == "mouse"
        and rep["n_genes"] == 4
        and rep["n_mapped"] == 3
        and rep["n_on_shared_tokens"] == 2
    )
    assert adata.var[COMPASS_TOKEN_KEY].tolist() == [
        vocab.token_id("ACTB"),
        vocab.token_id("mouse:Gm1"),
        vocab.token_id("TP53"),
        -1,
    ]
    with pytest.raises(ValueError, match="already exists"):
        pg.pp.compass_map_genes(adata, vocab)
    bad = ad.AnnData(
        np.ones((1, 2), np.float32), var=pd.DataFrame(index=["MALAT1", "CD24P4"])
    )  # human-only genes
    with pytest.raises(ValueError, match="None of the 2 genes maps.*maybe 'human'"):
        pg.pp.compass_map_genes(bad, vocab, species="mouse")


def test_real_mgi_and_gene_ids(shared_data):
    o = pg.pp.mgi_orthologs(shared_data / "orthologs" / "HOM_MouseHumanSequence.rpt.gz")
    # README: 21,813 classes, 18,707 strict 1:1
    assert o["class_key"].nunique() == 21813
    assert o.loc[o["one_to_one"], "class_key"].nunique() == 18707
    v = pg.pp.compass_vocab(o)
    assert len(v.mouse_shared) == 18707
    assert v.lookup(["Actb"], "mouse")[0] == v.lookup(["ACTB"], "human")[0]
    hsmm = ad.read_h5ad(shared_data / "scrna" / "hsmm_trapnell2014_fpkm.h5ad", backed="r")
    table = pg.pp.gene_id_table(shared_data / "gene_ids" / "celltypist_GENCODEv44_Gene_id2name.csv.gz")
    assert table["ENSG00000075624"] == "ACTB"
    adata = ad.AnnData(var=hsmm.var.copy())
    pg.pp.compass_map_genes(adata, v, species="human", gene_ids=table)
    by_symbol = ad.AnnData(var=hsmm.var.copy())
    pg.pp.compass_map_genes(by_symbol, v, species="human", gene_symbols="gene_short_name")
    n1, n2 = adata.uns[COMPASS_TOKEN_KEY]["n_mapped"], by_symbol.uns[COMPASS_TOKEN_KEY]["n_mapped"]
    assert n1 > 15000 and n2 > 15000 and abs(n1 - n2) < 0.1 * n1
    hgnc = pg.pp.gene_id_table(shared_data / "gene_families" / "hgnc_complete_set.txt.gz")
    assert hgnc["ENSG00000141510"] == "TP53"


def test_mgi_pooch_loopback(tmp_path, loopback):
    www, base = loopback
    write_mgi(www / "HOM_MouseHumanSequence.rpt")
    o = pg.pp.mgi_orthologs(url=f"{base}/HOM_MouseHumanSequence.rpt", cache_dir=tmp_path / "cache")
    assert [f.name.split("-")[0] for f in (tmp_path / "cache").iterdir()] == ["HOM_MouseHumanSequence"]
    assert len(o) == len(MGI_ROWS) and o["one_to_one"].sum() == 6
    # cached: a second call does not need the server's file
    (www / "HOM_MouseHumanSequence.rpt").unlink()
    assert len(
        pg.pp.mgi_orthologs(url=f"{base}/HOM_MouseHumanSequence.rpt", cache_dir=tmp_path / "cache")
    ) == len(MGI_ROWS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pg.pp.mgi_orthologs(tmp_path / "missing.rpt")

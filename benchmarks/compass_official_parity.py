"""Largest absolute differences between our GeneCompass and the published code, case by case.

Reads the published-format fixture (``../shared/data/genecompass_official_format``: a tiny checkpoint
written by the published code, its inputs tokenized by the published preprocessing and the published
code's outputs), loads it with ``GeneCompass.load_official``, recomputes every output and the
tokenization, and writes the max |difference| of each case to
benchmarks/results/compass_official_parity.json (``--out``). ``tests/test_compass_official.py``
asserts the same comparisons at the fixture's tolerances.

    python benchmarks/compass_official_parity.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import versions, write_record

FIX = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "genecompass_official_format"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", default=str(FIX))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compass_official_parity.json"))
    args = ap.parse_args()
    fix = Path(args.fixture)
    if not (fix / "outputs.npz").is_file():
        raise SystemExit(f"fixture not found at {fix}")

    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import torch

    import pertpy_gnn as pg
    from pertpy_gnn.compass import GeneCompass
    from pertpy_gnn.compass._module import IDS, LABEL_IDS, LABEL_VALUES, VALUES

    model = GeneCompass.load_official(
        fix / "checkpoint",
        prior_knowledge_dir=fix / "prior_knowledge",
        gene_medians=sorted((fix / "preprocess").glob("*_gene_median_after_filter.pickle")),
    )
    m = model.module
    inp, out = np.load(fix / "inputs.npz"), np.load(fix / "outputs.npz")
    t = torch.from_numpy
    diffs: dict[str, float] = {}

    def d(name, got, key=None):
        got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
        diffs[name] = float(np.abs(got - out[key or name]).max())

    def fwd(ids, vals, spc, mask, hs=None):
        with torch.no_grad():
            h = m.encode_genes(t(ids), t(vals), None if spc is None else t(spc), t(mask), hidden_states=hs)
            return (h, *m.heads(h[:, 1:]))

    ids, vals, mask, spc = inp["input_ids"], inp["values"], inp["attention_mask"], inp["species"]
    hs: list = []
    h, lg, vp = fwd(ids, vals, spc, mask, hs)
    d("unmasked_logits", lg)
    d("unmasked_value_pred", vp)
    d("unmasked_hidden_states", torch.stack(hs))
    d("unmasked_last_hidden_state", h)
    d("unmasked_cell_emb_cls", h[:, 0])
    d("unmasked_gene_emb", h[:, 1:])
    for i, n in enumerate(inp["lengths"]):
        hi = fwd(ids[i : i + 1, :n], vals[i : i + 1, :n], spc[i : i + 1], np.ones((1, n), np.int64))[0]
        d(f"downstream_cell{i}_last_hidden_state", hi[0])
    d("species_none_last_hidden_state", fwd(ids, vals, None, mask)[0])
    m.emb_warmup.alpha.fill_(0.5 + 1 / 10000)  # the published forward steps the warm-up first
    h, lg, vp = fwd(ids, vals, spc, mask)
    m.emb_warmup.alpha.fill_(1.0)
    d("alpha0p5_logits", lg)
    d("alpha0p5_value_pred", vp)
    d("alpha0p5_last_hidden_state", h)
    mi, mv, ma, ms = (
        out[k] for k in ("masked_input_ids", "masked_values", "masked_attention_mask", "masked_species")
    )
    h, lg, vp = fwd(mi, mv, ms, ma)
    d("masked_logits", lg)
    d("masked_value_pred", vp)
    d("masked_last_hidden_state", h)
    tensors = {
        IDS: torch.cat([m.species_tokens[t(ms).view(-1)].view(-1, 1), t(mi)], 1),
        VALUES: torch.cat([torch.zeros(len(mi), 1), t(mv)], 1),
        LABEL_IDS: torch.cat([torch.full((len(mi), 1), -100), t(out["masked_labels"])], 1),
        LABEL_VALUES: torch.cat([torch.zeros(len(mi), 1), t(out["masked_labels_values"])], 1),
    }
    with torch.no_grad():
        loss = m(tensors)[2]
    d("loss_total", loss.loss)
    d("loss_id", loss.extra_metrics["loss_id"])
    d("loss_value", loss.extra_metrics["loss_value"])
    # tokenization of the raw counts
    tok = {"input_ids": 0.0, "values": 0.0}
    vocab = model.vocab
    with tempfile.TemporaryDirectory() as tmp:
        for i, species in enumerate(["human", "human", "mouse", "mouse"]):
            genes = [g for g in vocab.tokens[2:] if g.startswith("ENSG" if species == "human" else "ENSMUSG")]
            a = ad.AnnData(
                sp.csr_matrix(inp[f"cell{i}_{species}_counts"][None]), var=pd.DataFrame(index=genes)
            )
            c = pg.pp.compass_tokenize(
                a,
                Path(tmp) / str(i),
                vocab,
                species=species,
                gene_medians=model.gene_medians_,
                max_len=ids.shape[1],
                progress_bar=False,
                **model.tokenization_,
            )
            ti, tv = c.read([0])
            tok["input_ids"] = max(tok["input_ids"], float(np.abs(ti[0, 1:] - ids[i]).max()))
            tok["values"] = max(tok["values"], float(np.abs(tv[0, 1:] - vals[i]).max()))
    record = {
        "what": "max |ours - published| on the published-format fixture (random weights, tiny config)",
        "tolerances": {"hidden_states_and_values": 1e-5, "logits_and_losses": 1e-4},
        "outputs_max_abs_diff": diffs,
        "tokenization_max_abs_diff": tok,
        "versions": versions("torch", "pertpy_gnn"),
    }
    write_record(record, Path(args.out))


if __name__ == "__main__":
    main()

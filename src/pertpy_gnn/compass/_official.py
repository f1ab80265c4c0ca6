"""Read and write GeneCompass checkpoints in the published on-disk format.

The published checkpoint is a Hugging Face ``BertForMaskedLM`` folder: ``config.json`` (BERT fields
plus ``use_values``, ``use_promoter``, ``use_co_exp``, ``use_gene_family``, ``use_peca_grn``,
``use_cls_token``) and ``pytorch_model.bin`` (a flat state dict whose names our
:class:`~pertpy_gnn.compass.CompassModule` uses as they are, prior matrices and homolog index
included). The token dictionary, id-to-symbol dictionary and gene medians are pickles of plain dicts,
read here with :func:`pertpy_gnn._pickle.read_plain_pickle`.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .._pickle import read_plain_pickle
from .._utils import logger
from ..pp._compass_vocab import MASK, PAD, CompassVocab
from ._module import OFFICIAL_PRIOR_NAMES, PRIOR_ORDER

CONFIG, WEIGHTS = "config.json", "pytorch_model.bin"
TOKEN_DICTS = ("human_mouse_tokens.pickle", "h&m_token1000W.pickle")
ID2NAME = "gene_list/Gene_id_name_dict_human_mouse.pickle"
HOMOLOGS = "homologous_hm_token.pickle"
MEDIANS = "gene_medians.pickle"
OUR_VOCAB = "pertpy_gnn_vocab.json"
#: the published preprocessing (preprocess/preprocess.py): counts / median, log2(1 + x), float32
OFFICIAL_TOKENIZATION = {
    "input_kind": "normalized",
    "log_base": 2.0,
    "missing_median": 1.0,
    "value_dtype": "float32",
}
_USE_FLAG = {
    "promoter": "use_promoter",
    "coexpression": "use_co_exp",
    "family": "use_gene_family",
    "grn": "use_peca_grn",
}
#: keys a published checkpoint may hold that the pre-training model does not use
_IGNORED = ("bert.embeddings.token_type_ids", "bert.pooler.", "classifier.")


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a published GeneCompass checkpoint folder holds {CONFIG} and {WEIGHTS}."
        )
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file may be truncated or corrupt.") from e
    if not isinstance(cfg, dict) or cfg.get("model_type") != "bert" or "hidden_size" not in cfg:
        raise ValueError(
            f"{path} is not the config of a GeneCompass checkpoint (expected a BERT config with hidden_size; "
            f"model_type is {cfg.get('model_type') if isinstance(cfg, dict) else None!r})."
        )
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{path}: hidden_act {act!r} is not supported (GeneCompass uses 'gelu').")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: only absolute position embeddings are supported.")
    return cfg


def _read_state(path: Path, map_location: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a published GeneCompass checkpoint folder holds {CONFIG} and {WEIGHTS}."
        )
    try:
        try:  # memory-mapped: the weights are not held twice while they are copied into the model
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise
        except Exception:  # noqa: BLE001 - a legacy (non-zip) file cannot be mapped: read it whole
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} could not be loaded with weights_only=True: it holds more than tensors ({e}). Only plain "
            "state dicts are read."
        ) from e
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable PyTorch state dict ({type(e).__name__}: {e}); the download may be "
            "truncated or corrupt."
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors.")
    if "bert.embeddings.word_embeddings.weight" not in state:
        raise ValueError(
            f"{path} is not a GeneCompass checkpoint: it lacks bert.embeddings.word_embeddings.weight "
            f"(first keys: {list(state)[:5]})."
        )
    return state


def _find(base: Path | None, given, names: Sequence[str]) -> Path | None:
    if given is not None:
        return Path(given)
    if base is None:
        return None
    for n in names:
        if (base / n).is_file():
            return base / n
    return None


def _official_vocab(
    token_path: Path, id2name_path: Path | None, homologous_index: np.ndarray
) -> CompassVocab:
    tok = read_plain_pickle(token_path)
    if not isinstance(tok, dict) or not all(isinstance(v, (int, np.integer)) for v in tok.values()):
        raise ValueError(f"{token_path} is not a token dictionary {{ensembl_id: token_id}}.")
    ids = np.array([int(v) for v in tok.values()])
    if sorted(ids.tolist()) != list(range(len(ids))):
        raise ValueError(f"{token_path}: token ids are not 0..{len(ids) - 1} without gaps.")
    tokens = np.empty(len(ids), dtype=object)
    tokens[ids] = [str(k) for k in tok]
    if tokens[0] != PAD or tokens[1] != MASK:
        raise ValueError(f"{token_path}: token 0 must be {PAD!r} and token 1 {MASK!r}.")
    symbols = {}
    if id2name_path is not None:
        names = read_plain_pickle(id2name_path)
        if not isinstance(names, dict):
            raise ValueError(f"{id2name_path} is not an id-to-symbol dictionary {{ensembl_id: symbol}}.")
        symbols = {str(k): str(v) for k, v in names.items() if str(k) in tok}
    moved = np.flatnonzero(homologous_index != np.arange(homologous_index.size))
    homologs = {int(i): int(homologous_index[i]) for i in moved}
    return CompassVocab(tokens.tolist(), symbols=symbols, homologs=homologs)


def _read_medians(paths) -> pd.Series | None:
    if paths is None:
        return None
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    merged: dict = {}
    for p in paths:
        d = read_plain_pickle(p)
        if not isinstance(d, dict):
            raise ValueError(f"{p} is not a gene-median dictionary {{ensembl_id: median}}.")
        merged.update({str(k): float(v) for k, v in d.items()})
    return pd.Series(merged, name="median", dtype=float).rename_axis("token")


def load_official(
    cls,
    checkpoint_dir,
    *,
    prior_knowledge_dir=None,
    token_dictionary=None,
    id_to_symbol=None,
    gene_medians=None,
    map_location: str = "cpu",
):
    """See :meth:`pertpy_gnn.compass.GeneCompass.load_official`."""
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise FileNotFoundError(
            f"{ckpt} is not a folder; pass the checkpoint folder holding {CONFIG} and {WEIGHTS}."
        )
    cfg = _read_config(ckpt / CONFIG)
    state = _read_state(ckpt / WEIGHTS, map_location)
    ours = cfg.get("pertpy_gnn", {})
    if prior_knowledge_dir is None and (ckpt / "prior_knowledge").is_dir():  # as save_official writes it
        prior_knowledge_dir = ckpt / "prior_knowledge"
    pk = Path(prior_knowledge_dir) if prior_knowledge_dir is not None else None
    wfile = ckpt / WEIGHTS
    V, H = state["bert.embeddings.word_embeddings.weight"].shape
    if int(cfg.get("vocab_size", V)) != V or int(cfg["hidden_size"]) != H:
        raise ValueError(
            f"{wfile} has a {V} x {H} word embedding, {ckpt / CONFIG} says vocab_size {cfg.get('vocab_size')} / "
            f"hidden_size {cfg['hidden_size']}: the two files are of different models."
        )
    hom = state.get("bert.embeddings.homologous_index", torch.arange(V)).cpu().numpy().astype(np.int64)
    # ---- vocabulary
    if (ckpt / OUR_VOCAB).is_file():
        vocab = CompassVocab.read(ckpt / OUR_VOCAB)
    else:
        tpath = _find(pk, token_dictionary, TOKEN_DICTS)
        if tpath is None:
            raise FileNotFoundError(
                "The token dictionary is needed: pass prior_knowledge_dir= (the published prior_knowledge/ folder "
                f"holding {' or '.join(TOKEN_DICTS)}) or token_dictionary= its path."
            )
        vocab = _official_vocab(tpath, _find(pk, id_to_symbol, [ID2NAME]), hom)
    if len(vocab) != V:
        raise ValueError(
            f"The token dictionary has {len(vocab)} tokens, {wfile} {V}: they are of different models."
        )
    # ---- configuration
    use_priors = tuple(
        n
        for n in PRIOR_ORDER
        if cfg.get(_USE_FLAG[n], False) and f"bert.embeddings.{OFFICIAL_PRIOR_NAMES[n]}_knowledge" in state
    )
    missing = [n for n in PRIOR_ORDER if cfg.get(_USE_FLAG[n], False) and n not in use_priors]
    if missing:
        raise ValueError(f"{ckpt / CONFIG} enables priors {missing} that {wfile} does not hold.")
    priors = {
        n: {
            "dim": int(state[f"bert.embeddings.{OFFICIAL_PRIOR_NAMES[n]}_knowledge"].shape[1]),
            "source": "published checkpoint",
        }
        for n in use_priors
    }
    n_layers = int(cfg["num_hidden_layers"])
    model = cls(
        None,
        vocab=vocab,
        seq_len=int(cfg["max_position_embeddings"]) + 1,
        priors=priors,
        preset=ours.get("preset", "cpu"),
        tokenization=ours.get("tokenization", OFFICIAL_TOKENIZATION),
        n_layers=n_layers,
        d_model=H,
        n_heads=int(cfg["num_attention_heads"]),
        d_ff=int(cfg["intermediate_size"]),
        dropout=float(cfg.get("hidden_dropout_prob", 0.1)),
        init_std=float(cfg.get("initializer_range", 0.02)),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        beta=float(ours.get("beta", 0.8)),
        use_values=bool(cfg["use_values"]),
        use_priors=use_priors,
    )
    # ---- weights
    module = model.module
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED)}
    ignored = [k for k in state if k not in expected]
    if ignored:
        raise ValueError(f"{wfile} holds parameters this architecture does not have, e.g. {ignored[:5]}.")
    bad = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if bad:
        raise ValueError(f"{wfile}: parameter shapes do not match its {CONFIG}: {bad[:3]} (file, expected).")
    optional = {
        "cls.predictions.decoder.weight",  # tied to the word embeddings
        "cls.predictions.decoder.bias",
        "cls4value.predictions.decoder.bias",
        "bert.embeddings.position_ids",
        "emb_warmup.alpha",
        "emb_warmup.steps",
        "bert.embeddings.homologous_index",
    }
    absent = [k for k in expected if k not in state and k not in optional]
    if absent:
        raise ValueError(
            f"{wfile} lacks {len(absent)} parameters of a GeneCompass checkpoint, e.g. {absent[:5]}."
        )
    for head in ("cls", "cls4value"):  # the decoder bias and the head's bias are one tensor
        if f"{head}.predictions.bias" not in state and f"{head}.predictions.decoder.bias" in state:
            state[f"{head}.predictions.bias"] = state[f"{head}.predictions.decoder.bias"]
    state.pop("cls.predictions.decoder.weight", None)
    state.pop("cls.predictions.decoder.bias", None)
    state.pop("cls4value.predictions.decoder.bias", None)
    module.load_state_dict(state, strict=False)
    del state
    module.tie_weights()
    module.to(map_location)
    medians = _read_medians(gene_medians)
    if medians is None and pk is not None and (pk / MEDIANS).is_file():
        medians = _read_medians(pk / MEDIANS)
    model.gene_medians_ = medians
    if medians is None and model.tokenization_.get("missing_median") is not None:
        logger.warning(
            "No gene medians given: new data will be tokenized with median 1 for every gene. Pass gene_medians= "
            "the published median pickles (human_gene_median_after_filter.pickle, ...)."
        )
    model.module.eval()
    model.is_trained_ = True
    logger.info("loaded %s from %s", model._model_summary_string, ckpt)
    return model


def save_official(model, path, *, overwrite: bool = False) -> Path:
    """See :meth:`pertpy_gnn.compass.GeneCompass.save_official`."""
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace the files there.")
    module, vocab, c = model.module, model.vocab, model.config_
    d = c["d_model"]
    cfg = {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "attention_probs_dropout_prob": c["dropout"],
        "hidden_dropout_prob": c["dropout"],
        "classifier_dropout": None,
        "hidden_act": "gelu",
        "hidden_size": d,
        "initializer_range": c["init_std"],
        "intermediate_size": int(c["d_ff"] or c["ff_mult"] * d),
        "layer_norm_eps": c["layer_norm_eps"],
        "max_position_embeddings": module.max_genes,
        "num_attention_heads": c["n_heads"],
        "num_hidden_layers": c["n_layers"],
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "type_vocab_size": 2,
        "use_cache": True,
        "vocab_size": len(vocab),
        "use_values": bool(c["use_values"]),
        **{_USE_FLAG[n]: n in c["use_priors"] for n in PRIOR_ORDER},
        "use_cls_token": True,
        "warmup_steps": 0,
        "emb_warmup_steps": 10000,
        # read back by load_official; ignored by the published code
        "pertpy_gnn": {"beta": c["beta"], "tokenization": model.tokenization_},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    torch.save(state, out / WEIGHTS)
    pk = out / "prior_knowledge"
    (pk / "gene_list").mkdir(parents=True, exist_ok=True)

    def dump(obj, name):
        with open(pk / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=4)

    dump({str(t): i for i, t in enumerate(vocab.tokens.tolist())}, TOKEN_DICTS[0])
    dump(dict(vocab.symbols), ID2NAME)
    dump({h: m for m, h in vocab.homologs.items()}, HOMOLOGS)
    if model.gene_medians_ is not None:
        med = model.gene_medians_
        dump({str(k): float(v) for k, v in zip(med.index, med.to_numpy(), strict=True)}, MEDIANS)
    if vocab.layout != "official":  # our vocabulary (symbols, shared ortholog tokens) in full
        vocab.write(out / OUR_VOCAB)
    logger.info("wrote GeneCompass in the published layout to %s", out)
    return out

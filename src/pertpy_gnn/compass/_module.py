"""The GeneCompass network (scvi-tools module): knowledge-embedded tokens -> BERT encoder -> heads."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput
from torch import nn

from ..pp._compass_priors import PRIOR_NAMES
from ..pp._compass_vocab import MASK_ID, PAD_ID, SPECIAL_TOKENS

#: named sizes: layers, hidden size, heads (paper: base 12 x 768 x 12; ablation 6 x 256 x 4)
PRESETS: dict[str, dict] = {
    "cpu": {"n_layers": 2, "d_model": 128, "n_heads": 4},
    "small": {"n_layers": 6, "d_model": 256, "n_heads": 4},
    "base": {"n_layers": 12, "d_model": 768, "n_heads": 12},
}
#: our prior names in the published concatenation order, and the published names
PRIOR_ORDER = ("promoter", "coexpression", "family", "grn")
OFFICIAL_PRIOR_NAMES = {
    "promoter": "promoter",
    "coexpression": "co_exp",
    "family": "gene_family",
    "grn": "peca_grn",
}
#: ids/values key of a batch and of masked-LM labels
IDS, VALUES, LABEL_IDS, LABEL_VALUES = "ids", "values", "label_ids", "label_values"
#: ways to read a cell embedding off the last-layer token states (see :func:`cell_embedding`)
CELL_EMBEDDINGS = ("species", "mean")


def cell_embedding(hidden: torch.Tensor, ids: torch.Tensor, how: str = "species") -> torch.Tensor:
    """Cell embeddings ``(b, d)`` from last-layer token states ``hidden`` ``(b, n, d)``.

    ``'species'``: the species token's state (paper). ``'mean'``: the mean state of the cell's gene
    tokens (special tokens and padding excluded), the pooling of Geneformer; under masked-token
    pre-training alone nothing trains the species token to summarize the cell, so the mean of the
    gene tokens is often the more informative embedding of a small or briefly trained model.
    """
    if how == "species":
        return hidden[:, 0]
    if how == "mean":
        gene = ids != PAD_ID
        gene[:, 0] = False  # the species column
        gene = gene.unsqueeze(-1).to(hidden.dtype)
        return (hidden * gene).sum(1) / gene.sum(1).clamp(min=1.0)
    raise ValueError(f"cell_embedding must be one of {CELL_EMBEDDINGS}, got {how!r}.")


def resolve_config(preset: str = "cpu", **overrides) -> dict:
    """Model configuration of a preset with ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}.")
    cfg = {
        "dropout": 0.02,
        "init_std": 0.02,
        "layer_norm_eps": 1e-12,
        "ff_mult": 4,
        "d_ff": None,
        "beta": 0.8,
        "use_values": True,
        "use_priors": PRIOR_NAMES,
        **PRESETS[preset],
    }
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"Unknown model options {sorted(unknown)}; allowed: {sorted(cfg)}.")
    cfg.update(overrides)
    if cfg["d_model"] % cfg["n_heads"]:
        raise ValueError(f"d_model ({cfg['d_model']}) must be a multiple of n_heads ({cfg['n_heads']}).")
    return cfg


def mask_tokens(
    ids: torch.Tensor,
    values: torch.Tensor,
    *,
    vocab_size: int,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
    n_special: int = len(SPECIAL_TOKENS),
) -> dict[str, torch.Tensor]:
    """BERT masking of gene tokens (never the species token or padding).

    Each gene token is selected with probability ``mask_prob``; of the selected, 80% become
    ``<mask>``, 10% a random gene token, 10% stay; the value of a ``<mask>`` or random token is set to
    ``-1`` (as in the published code). Ids below ``n_special`` (padding, ``<mask>``, species) are
    never selected nor drawn; column 0 (the species) never is. Returns the corrupted
    ``ids``/``values`` and ``label_ids`` (``-100`` where not selected) / ``label_values``.
    """
    dev = ids.device
    gene = (ids >= n_special) & (ids != PAD_ID)
    gene[:, 0] = False  # the species column
    u = torch.rand(ids.shape, device=dev, generator=generator)
    selected = gene & (u < mask_prob)
    v = torch.rand(ids.shape, device=dev, generator=generator)
    to_mask = selected & (v < 0.8)
    to_random = selected & (v >= 0.8) & (v < 0.9)
    rand_ids = torch.randint(n_special, vocab_size, ids.shape, device=dev, generator=generator)
    new_ids = torch.where(to_mask, torch.full_like(ids, MASK_ID), torch.where(to_random, rand_ids, ids))
    new_values = torch.where(to_mask | to_random, torch.full_like(values, -1.0), values)
    return {
        IDS: new_ids,
        VALUES: new_values,
        LABEL_IDS: torch.where(selected, ids, torch.full_like(ids, -100)),
        LABEL_VALUES: values,
    }


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` (the activation of GeneCompass's ``cat_gelu``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Linear1(nn.Module):
    """Holder of one prior's projection (state-dict name ``<prior>_embeddings.linear1``)."""

    def __init__(self, dim_in: int, d: int):
        super().__init__()
        self.linear1 = nn.Linear(dim_in, d)


class _EmbWarmup(nn.Module):
    """``alpha`` (scale of the four projected priors) and ``steps``, stored as in the published checkpoint."""

    def __init__(self):
        super().__init__()
        self.register_buffer("alpha", torch.tensor(1.0))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))


class _Embeddings(nn.Module):
    """Knowledge embedding: ``concat(word, value, alpha * Linear_k(prior_k[ids]) ...)`` -> MLP -> + position -> LN."""

    def __init__(
        self,
        vocab_size: int,
        max_positions: int,
        d: int,
        *,
        priors: Mapping[str, torch.Tensor],
        use_priors: tuple[str, ...],
        use_values: bool,
        eps: float,
        dropout: float,
    ):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, d, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(max_positions, d)
        self.token_type_embeddings = nn.Embedding(2, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_positions).unsqueeze(0))
        self.use_values = bool(use_values)
        self.priors = tuple(OFFICIAL_PRIOR_NAMES[n] for n in PRIOR_ORDER if n in use_priors)
        self.fixed = set()
        for name in PRIOR_ORDER:
            if name not in use_priors:
                continue
            key = OFFICIAL_PRIOR_NAMES[name]
            if name in priors:
                mat = torch.as_tensor(priors[name], dtype=torch.float32)
                if mat.ndim != 2 or mat.shape[0] != vocab_size:
                    raise ValueError(
                        f"Prior {name!r} has shape {tuple(mat.shape)}, expected ({vocab_size}, dim) (one row per token)."
                    )
                self.register_buffer(f"{key}_knowledge", mat.clone())
                self.fixed.add(key)
            else:  # learned in place of a fixed prior
                self.register_parameter(f"{key}_knowledge", nn.Parameter(torch.zeros(vocab_size, d)))
            dim = getattr(self, f"{key}_knowledge").shape[1]
            setattr(self, f"{key}_embeddings", _Linear1(dim, d))
        self.register_buffer("homologous_index", torch.arange(vocab_size))
        width = d * (1 + len(self.priors)) + int(self.use_values)
        self.concat_embeddings = nn.Sequential(
            OrderedDict(
                cat_fc=nn.Linear(width, d),
                cat_ln=nn.LayerNorm(d),  # PyTorch default eps (1e-5), as published
                cat_gelu=QuickGELU(),
                cat_proj=nn.Linear(d, d),
            )
        )

    def forward(
        self, ids: torch.Tensor, values: torch.Tensor, species: torch.Tensor | None, alpha: torch.Tensor
    ) -> torch.Tensor:
        parts = [self.word_embeddings(ids)]
        if self.use_values:
            parts.append(values.unsqueeze(-1).to(parts[0].dtype))
        # prior rows: mouse cells look their genes up through the homolog index (word embedding: own id)
        pid = (
            ids if species is None else torch.where(species.view(-1, 1) == 1, self.homologous_index[ids], ids)
        )
        for key in self.priors:
            e = getattr(self, f"{key}_embeddings").linear1(getattr(self, f"{key}_knowledge")[pid])
            parts.append(alpha.to(e.dtype) * e)
        x = self.concat_embeddings(torch.cat(parts, dim=-1))
        x = x + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(self.position_ids[:, : ids.shape[1]])
        return self.dropout(self.LayerNorm(x))


class _SelfAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)


class _AddNorm(nn.Module):
    """``LayerNorm(residual + dropout(dense(x)))`` (BERT's ``*.output`` blocks)."""

    def __init__(self, d_in: int, d: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, d: int, eps: float, dropout: float):
        super().__init__()
        self.self = _SelfAttention(d)
        self.output = _AddNorm(d, d, eps, dropout)


class _Intermediate(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.dense = nn.Linear(d, d_ff)


class _EncoderLayer(nn.Module):
    """Post-LN BERT layer (BERT's parameter names); attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float, eps: float):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.attention = _Attention(d, eps, dropout)
        self.intermediate = _Intermediate(d, d_ff)
        self.output = _AddNorm(d_ff, d, eps, dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        sa = self.attention.self

        def split(t):
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(
            split(sa.query(x)),
            split(sa.key(x)),
            split(sa.value(x)),
            attn_mask=attn_mask,
            dropout_p=self.p if self.training else 0.0,
        )
        x = self.attention.output(a.transpose(1, 2).reshape(b, n, d), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Encoder(nn.Module):
    def __init__(self, n_layers: int, d: int, heads: int, d_ff: int, dropout: float, eps: float):
        super().__init__()
        self.layer = nn.ModuleList([_EncoderLayer(d, heads, d_ff, dropout, eps) for _ in range(n_layers)])


class _Bert(nn.Module):
    def __init__(self, embeddings: _Embeddings, encoder: _Encoder, d: int):
        super().__init__()
        self.embeddings = embeddings
        self.cls_embedding = nn.Embedding(2, d)  # row 0 human, row 1 mouse
        self.encoder = encoder


class _Transform(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class _Predictions(nn.Module):
    """BERT prediction head: transform, then a decoder whose bias is the head's ``bias``."""

    def __init__(self, d: int, n_out: int, eps: float):
        super().__init__()
        self.transform = _Transform(d, eps)
        self.decoder = nn.Linear(d, n_out, bias=False)
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class _Head(nn.Module):
    def __init__(self, d: int, n_out: int, eps: float):
        super().__init__()
        self.predictions = _Predictions(d, n_out, eps)


class CompassModule(BaseModuleClass):
    """GeneCompass network, the architecture of the published GeneCompass (Yang et al. 2024).

    Token embedding: ``concat(word embedding, value, alpha * Linear(promoter), alpha * Linear(co-expression),
    alpha * Linear(gene family), alpha * Linear(GRN))`` (the value appended as one raw scalar; a prior
    row looked up through the homolog index for mouse cells), then ``Linear -> LayerNorm(eps 1e-5) ->
    QuickGELU -> Linear``, plus token-type-0 and rank-position embeddings, ``LayerNorm``, dropout. The
    species (CLS) embedding is prepended after that LayerNorm, without a position embedding; a post-LN
    BERT encoder follows. Heads act on the gene positions: gene id (decoder tied to the word
    embeddings) and value. Parameter and buffer names are the published checkpoint's
    (``bert.embeddings.*``, ``bert.cls_embedding``, ``bert.encoder.layer.N.*``, ``cls.predictions.*``,
    ``cls4value.predictions.*``, ``emb_warmup.*``), so the state dict loads in both directions.

    A prior given as a fixed ``(vocab_size, dim)`` matrix is a buffer (as published); a prior not
    given is a learned ``(vocab_size, d_model)`` matrix in its place (our departure: a model trained
    without that prior source).

    Token sequences (``ids``, ``values``) hold the species in column 0 (``species_tokens``: the ids
    meaning human and mouse there) and then the genes; :meth:`encode` returns ``(b, 1 + L, d)`` states,
    the species (CLS) state first.

    Parameters
    ----------
    vocab_size
        Number of tokens.
    seq_len
        Maximum sequence length (species + genes); the model has ``seq_len - 1`` gene positions.
    priors
        ``{name: (vocab_size, dim) tensor}`` for the priors given (names in ``PRIOR_NAMES``).
    n_layers, d_model, n_heads, ff_mult, d_ff, dropout, init_std, layer_norm_eps
        Encoder size and regularization (paper: GELU, dropout 0.02, init std 0.02, eps 1e-12);
        ``d_ff`` (default ``ff_mult * d_model``) is the feed-forward width.
    beta
        Loss weight: ``(1 - beta) * L_id + beta * L_value`` (published: 0.8).
    use_values, use_priors
        Which inputs enter the token embedding (published: the value and all four priors).
    species_tokens
        Ids in column 0 meaning human and mouse.
    n_special
        Number of special tokens (ids below it are never masked or drawn as random tokens).
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        *,
        priors: Mapping[str, torch.Tensor] | None = None,
        n_layers: int = 2,
        d_model: int = 128,
        n_heads: int = 4,
        ff_mult: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.02,
        init_std: float = 0.02,
        layer_norm_eps: float = 1e-12,
        beta: float = 0.8,
        use_values: bool = True,
        use_priors: tuple[str, ...] = PRIOR_NAMES,
        species_tokens: tuple[int, int] = (2, 3),
        n_special: int = len(SPECIAL_TOKENS),
    ):
        super().__init__()
        priors = dict(priors or {})
        unknown = (set(priors) | set(use_priors)) - set(PRIOR_NAMES)
        if unknown:
            raise ValueError(f"Unknown priors {sorted(unknown)}; names are {PRIOR_NAMES}.")
        self.vocab_size, self.seq_len, self.beta, self.init_std = vocab_size, seq_len, beta, init_std
        self.d_model, self.n_special = d_model, int(n_special)
        self.prior_names = PRIOR_NAMES
        self.register_buffer(
            "species_tokens", torch.as_tensor(species_tokens, dtype=torch.int64), persistent=False
        )
        d = d_model
        embeddings = _Embeddings(
            vocab_size,
            seq_len - 1,
            d,
            priors=priors,
            use_priors=tuple(use_priors),
            use_values=use_values,
            eps=layer_norm_eps,
            dropout=dropout,
        )
        encoder = _Encoder(n_layers, d, n_heads, d_ff or ff_mult * d, dropout, layer_norm_eps)
        self.bert = _Bert(embeddings, encoder, d)
        self.cls = _Head(d, vocab_size, layer_norm_eps)
        self.cls4value = _Head(d, 1, layer_norm_eps)
        self.emb_warmup = _EmbWarmup()
        self.apply(self._init)
        for key in embeddings.priors:
            if key not in embeddings.fixed:
                nn.init.normal_(getattr(embeddings, f"{key}_knowledge"), std=init_std)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Tie the id decoder to the word embeddings (as published)."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, _Predictions):
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------ network
    @property
    def max_genes(self) -> int:
        """Gene positions of the model (``seq_len - 1``)."""
        return self.seq_len - 1

    def species_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Species index (0 human, 1 mouse) of token sequences from their column 0."""
        return (ids[:, 0] == self.species_tokens[1]).long()

    def encode_genes(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        species: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        hidden_states: list | None = None,
    ) -> torch.Tensor:
        """States ``(b, 1 + L, d)`` of gene tokens ``(b, L)`` in the published model's calling convention.

        ``species`` ``(b,)`` or ``(b, 1)`` (0 human, 1 mouse; ``None``: the human species row and no
        homolog remapping, as the published sequence classifier calls it); ``attention_mask``
        ``(b, L)`` (1 = attend; ``None``: every position). A list given as ``hidden_states``
        receives the embedding output and every layer's output (as published ``hidden_states``).
        """
        if input_ids.shape[1] > self.max_genes:
            raise ValueError(f"Sequences of {input_ids.shape[1]} genes exceed the model's {self.max_genes}.")
        sp = None if species is None else species.reshape(-1).long()
        x = self.bert.embeddings(input_ids, values, sp, self.emb_warmup.alpha)
        cls_ids = torch.zeros(input_ids.shape[0], dtype=torch.long, device=x.device) if sp is None else sp
        x = torch.cat([self.bert.cls_embedding(cls_ids).unsqueeze(1).to(x.dtype), x], dim=1)
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            keep = torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask], 1).bool()
            mask = keep[:, None, None, :]
        if hidden_states is not None:
            hidden_states.append(x)
        for layer in self.bert.encoder.layer:
            x = layer(x, mask)
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def encode(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Last-layer states ``(b, n, d)`` of token sequences (species in column 0); padding is not attended to."""
        if ids.shape[1] > self.seq_len:
            raise ValueError(f"Sequences of {ids.shape[1]} tokens exceed the model's {self.seq_len}.")
        genes = ids[:, 1:]
        return self.encode_genes(genes, values[:, 1:], self.species_of(ids), genes != PAD_ID)

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gene-id logits ``(..., vocab_size)`` and value predictions ``(...)`` of token states ``(..., d)``."""
        return self.cls.predictions(hidden), self.cls4value.predictions(hidden).squeeze(-1)

    # ----------------------------------------------------------------- scvi-tools module API
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        return {IDS: tensors[IDS].long(), VALUES: tensors[VALUES].float()}

    def inference(self, ids: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoder: ``{'hidden': (b, n, d)}``."""
        return {"hidden": self.encode(ids, values)}

    def _get_generative_input(self, tensors, inference_outputs, **kwargs) -> dict:
        selected = tensors[LABEL_IDS] != -100 if LABEL_IDS in tensors else None
        return {"hidden": inference_outputs["hidden"], "selected": selected}

    def generative(
        self, hidden: torch.Tensor, selected: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Heads on the selected (masked) positions (all positions when ``selected`` is None)."""
        h = hidden[selected] if selected is not None else hidden
        logits, value = self.heads(h)
        return {"id_logits": logits, "value_pred": value}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """``(1 - beta) * CE(masked ids) + beta * MSE(masked values)``."""
        selected = tensors[LABEL_IDS] != -100
        labels = tensors[LABEL_IDS][selected].long()
        target = tensors[LABEL_VALUES][selected].float()
        logits = generative_outputs["id_logits"].float()
        pred = generative_outputs["value_pred"].float()
        n = labels.numel()
        if n == 0:
            zero = logits.sum() * 0.0 + pred.sum() * 0.0
            l_id = l_value = zero
            acc = zero.detach()
        else:
            l_id = F.cross_entropy(logits, labels)
            l_value = F.mse_loss(pred, target)
            acc = (logits.argmax(-1) == labels).float().mean().detach()
        loss = (1 - self.beta) * l_id + self.beta * l_value
        return LossOutput(
            loss=loss,
            n_obs_minibatch=tensors[IDS].shape[0],
            extra_metrics={
                "loss_id": l_id.detach(),
                "loss_value": l_value.detach(),
                "accuracy": acc,
                "n_masked": torch.tensor(float(n)),
            },
        )

    @torch.inference_mode()
    def sample(self, *args, **kwargs):
        """Not a generative model of counts: use the heads through :meth:`generative`."""
        raise NotImplementedError("GeneCompass predicts masked tokens; it does not sample expression.")

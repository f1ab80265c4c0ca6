"""The GeneCompass network (scvi-tools module): knowledge-embedded tokens -> BERT encoder -> heads."""

from __future__ import annotations

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
        gene = (ids >= len(SPECIAL_TOKENS)).unsqueeze(-1).to(hidden.dtype)
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
        "beta": 0.8,
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
) -> dict[str, torch.Tensor]:
    """BERT masking of gene tokens (never the species token or padding).

    Each gene token is selected with probability ``mask_prob``; of the selected, 80% become
    ``<mask>``, 10% a random gene token, 10% stay; the value of a ``<mask>`` or random token is set to
    ``-1`` (as in the published code). Returns the corrupted ``ids``/``values`` and ``label_ids``
    (``-100`` where not selected) / ``label_values``.
    """
    dev = ids.device
    gene = (ids >= len(SPECIAL_TOKENS)) & (ids != PAD_ID)
    u = torch.rand(ids.shape, device=dev, generator=generator)
    selected = gene & (u < mask_prob)
    v = torch.rand(ids.shape, device=dev, generator=generator)
    to_mask = selected & (v < 0.8)
    to_random = selected & (v >= 0.8) & (v < 0.9)
    rand_ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, ids.shape, device=dev, generator=generator)
    new_ids = torch.where(to_mask, torch.full_like(ids, MASK_ID), torch.where(to_random, rand_ids, ids))
    new_values = torch.where(to_mask | to_random, torch.full_like(values, -1.0), values)
    return {
        IDS: new_ids,
        VALUES: new_values,
        LABEL_IDS: torch.where(selected, ids, torch.full_like(ids, -100)),
        LABEL_VALUES: values,
    }


class _EncoderLayer(nn.Module):
    """Post-LN BERT layer; attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float, eps: float):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.p if self.training else 0.0
        )
        x = self.ln1(x + self.drop(self.out(a.transpose(1, 2).reshape(b, n, d))))
        return self.ln2(x + self.drop(self.ff2(F.gelu(self.ff1(x)))))


class CompassModule(BaseModuleClass):
    """GeneCompass network.

    Token embedding = MLP(concat(gene-id embedding, value embedding, promoter, GRN, family,
    co-expression embeddings)) + rank position embedding, then a BERT encoder and two heads on the
    masked positions (gene id: cross-entropy over the vocabulary; value: MSE). A prior given as a
    fixed ``(vocab_size, dim)`` matrix goes through a linear layer; an absent prior is a learned
    ``nn.Embedding`` in its place.

    Parameters
    ----------
    vocab_size
        Number of tokens.
    seq_len
        Maximum sequence length (species token + genes).
    priors
        ``{name: (vocab_size, dim) tensor}`` for the priors given (names in ``PRIOR_NAMES``).
    n_layers, d_model, n_heads, ff_mult, dropout, init_std, layer_norm_eps
        Encoder size and regularization (paper: GELU, dropout 0.02, init std 0.02, eps 1e-12).
    beta
        Loss weight: ``(1 - beta) * L_id + beta * L_value``.
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
        dropout: float = 0.02,
        init_std: float = 0.02,
        layer_norm_eps: float = 1e-12,
        beta: float = 0.8,
    ):
        super().__init__()
        priors = dict(priors or {})
        unknown = set(priors) - set(PRIOR_NAMES)
        if unknown:
            raise ValueError(f"Unknown priors {sorted(unknown)}; names are {PRIOR_NAMES}.")
        self.vocab_size, self.seq_len, self.beta, self.init_std = vocab_size, seq_len, beta, init_std
        d = d_model
        self.gene_embedding = nn.Embedding(vocab_size, d, padding_idx=PAD_ID)
        self.value_embedding = nn.Linear(1, d)
        self.prior_names = PRIOR_NAMES
        self.prior_proj = nn.ModuleDict()
        self.prior_learned = nn.ModuleDict()
        for name in PRIOR_NAMES:
            if name in priors:
                mat = torch.as_tensor(priors[name], dtype=torch.float32)
                if mat.shape[0] != vocab_size:
                    raise ValueError(
                        f"Prior {name!r} has {mat.shape[0]} rows, the vocabulary {vocab_size} tokens."
                    )
                self.register_buffer(f"prior_{name}", mat)
                self.prior_proj[name] = nn.Linear(mat.shape[1], d)
            else:
                self.prior_learned[name] = nn.Embedding(vocab_size, d)
        self.token_mlp = nn.Sequential(
            nn.Linear(d * (2 + len(PRIOR_NAMES)), d),
            nn.LayerNorm(d, eps=layer_norm_eps),
            nn.GELU(),
            nn.Linear(d, d),
        )
        self.position_embedding = nn.Embedding(seq_len, d)
        self.embed_norm = nn.LayerNorm(d, eps=layer_norm_eps)
        self.embed_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            [_EncoderLayer(d, n_heads, ff_mult * d, dropout, layer_norm_eps) for _ in range(n_layers)]
        )
        self.head_transform = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=layer_norm_eps))
        self.id_head = nn.Linear(d, vocab_size)
        self.value_head = nn.Linear(d, 1)
        self.apply(self._init)

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

    # ------------------------------------------------------------------------------ network
    def embed(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``(b, n, d)`` of token ids and values."""
        parts = [
            self.gene_embedding(ids),
            self.value_embedding(values.unsqueeze(-1).to(self.value_embedding.weight.dtype)),
        ]
        for name in PRIOR_NAMES:
            if name in self.prior_proj:
                parts.append(self.prior_proj[name](getattr(self, f"prior_{name}")[ids]))
            else:
                parts.append(self.prior_learned[name](ids))
        x = self.token_mlp(torch.cat(parts, dim=-1))
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.embed_drop(self.embed_norm(x + self.position_embedding(pos)))

    def encode(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Last-layer token states ``(b, n, d)``; padding is not attended to."""
        if ids.shape[1] > self.seq_len:
            raise ValueError(f"Sequences of {ids.shape[1]} tokens exceed the model's {self.seq_len}.")
        pad = ids == PAD_ID
        attn_mask = (~pad)[:, None, None, :] if bool(pad.any()) else None
        x = self.embed(ids, values)
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x

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
        h = self.head_transform(h)
        return {"id_logits": self.id_head(h), "value_pred": self.value_head(h).squeeze(-1)}

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

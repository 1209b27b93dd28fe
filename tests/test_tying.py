"""Weight tying (an Embedding and a Linear head sharing their weight): the per-sample
gradient of the tied weight is the sum of both uses, clipped once, against the oracle."""

from __future__ import annotations

import math

import pytest
import torch
from oracle import assert_close_sums, fastdp_grad_sum, oracle_grad_sum
from torch import nn

import fastdp


class TiedLM(nn.Module):
    def __init__(self, vocab=11, dim=6, padding_idx=None):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.wte(ids))))


def _data(batch=5, tokens=4, vocab=11, scale=3.0):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (batch, tokens))
    ids[0] = ids[0, 0]  # a sample repeating one token: its cross term is large
    return ids, torch.randn(batch, tokens, vocab) * scale


@pytest.mark.parametrize("mode", ["flat", "automatic", "none"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_tied_embedding_and_head_match_the_oracle(mode, padding_idx):
    model = TiedLM(padding_idx=padding_idx)
    ids, y = _data()
    expected = oracle_grad_sum(model, ids, y, mode, 0.7)
    got = fastdp_grad_sum(model, ids, y, mode, 0.7)
    assert_close_sums(got, expected)
    two = fastdp_grad_sum(model, ids, y, mode, 0.7, micro_batch=2)
    assert_close_sums(two, expected)


def test_tied_sample_contributes_at_most_c():
    """A sample whose two uses align (one repeated token whose logit target pulls hard):
    norms summed per use without the cross term put it at 1.04 C."""
    model = TiedLM()
    ids = torch.full((1, 4), 5)
    y = torch.zeros(1, 4, 11)
    y[0, :, 5] = -1000.0
    got = fastdp_grad_sum(model, ids, y, "flat", 1.0)
    assert math.sqrt(sum(float(g.double().square().sum()) for g in got.values())) <= 1 + 1e-5


def test_per_layer_clipping_refuses_a_tie():
    model = TiedLM()
    ids, y = _data()
    with pytest.raises(ValueError, match="per_layer.*tied weight"):
        fastdp_grad_sum(model, ids, y, "per_layer", 1.0)


def test_unsupported_ties_are_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 4)), batch_size=4
    )
    with pytest.raises(ValueError, match="weight tying.*tie_word_embeddings=False"):
        fastdp.PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


def test_gpt2_with_tied_embeddings_matches_the_oracle():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=23, n_positions=8, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=True
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()  # no dropout: the oracle is exact
    model.config.use_cache = False

    class Logits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(input_ids=ids).logits

    wrapped = Logits(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, y = _data(batch=3, tokens=5, vocab=23, scale=1.0)
    expected = oracle_grad_sum(wrapped, ids, y, "flat", 0.05)
    got = fastdp_grad_sum(wrapped, ids, y, "flat", 0.05)
    assert_close_sums(got, expected)

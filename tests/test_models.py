"""Models people train, as shipped, against the float64 single-sample oracle (tests/oracle.py).

Built from tiny random configs (nothing is downloaded): transformers (GPT-2, BERT, Llama, ViT,
a PEFT LoRA model), timm (ViT, ResNet with GroupNorm, ConvNeXt), torch built-ins
(nn.TransformerEncoder, Conv3d, ConvTranspose2d, InstanceNorm2d, PReLU) and local stand-ins
for the timm patterns (a parent owning a class token, LayerNorm2d, layer scale, a residual
``out += identity``). The optional packages skip cleanly when absent (``pip install
fastdp[hf]`` with .ci/constraints.txt, and ``pip install --no-deps timm``, as .ci/run does).
timm imports torchvision, absent there or not importable beside the CPU torch (a CUDA wheel),
though its models never use it: tests/torchvision_stub.py stands in while timm is imported.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision_stub
from oracle import assert_close_sums, fastdp_grad_sum, oracle_grad_sum
from standin_models import ConvNeXtBlock, GroupNormAct, LayerNorm2d, ResNetGN, TinyViT
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp

B, T, VOCAB, HIDDEN = 3, 5, 17, 16


def _import_or_skip(name: str):
    """Like pytest.importorskip, but also skips a package that is installed and broken
    (timm with a torchvision wheel that does not load on this torch)."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # ImportError, or RuntimeError from a broken extension
        pytest.skip(f"{name} not importable: {type(err).__name__}: {err}")


class Output(nn.Module):
    """The tensor a transformers model returns (logits), from a positional input."""

    def __init__(self, model: nn.Module, key: str = "input_ids", field: str = "logits"):
        super().__init__()
        self.model, self.key, self.field = model, key, field

    def forward(self, x):
        return getattr(self.model(**{self.key: x}), self.field)


def _images(batch: int = B, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, dtype=torch.float64)


def _ids(batch: int = B) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T))


# ---- the models ------------------------------------------------------------------------------
def _gpt2(tied: bool = False):
    """GPT-2; ``tied``: as shipped, wte and lm_head one weight."""
    transformers = _import_or_skip("transformers")
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=8, n_embd=HIDDEN, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return Output(transformers.GPT2LMHeadModel(config)), _ids()


def _bert():
    transformers = _import_or_skip("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=8, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    return Output(transformers.BertForSequenceClassification(config)), _ids()


def _llama_config(transformers):
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
        tie_word_embeddings=False,
    )  # fmt: skip


def _llama():
    transformers = _import_or_skip("transformers")
    return Output(transformers.LlamaForCausalLM(_llama_config(transformers))), _ids()


def _hf_vit():
    transformers = _import_or_skip("transformers")
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )  # fmt: skip
    return Output(transformers.ViTForImageClassification(config), "pixel_values"), _images()


class Seq2Seq(nn.Module):
    """A transformers encoder-decoder's logits from ids: the decoder reads the first ids
    reversed (different positions and ids than the encoder's)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_ids=x, decoder_input_ids=x[:, :3].flip(1)).logits


def _t5(tied: bool = True):
    """T5 as shipped: one weight for the shared, encoder and decoder embeddings (the last two
    called in one pass) and, tied (T5 v1.0), the head; relative attention bias on (q, k) ids."""
    transformers = _import_or_skip("transformers")
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        dropout_rate=0.0, relative_attention_num_buckets=8,
    )  # fmt: skip
    config.tie_word_embeddings = tied  # T5 v1.1: separate head (the constructor ignores it)
    return Seq2Seq(transformers.T5ForConditionalGeneration(config)), _ids()


def _lora(**options):
    transformers = _import_or_skip("transformers")
    peft = _import_or_skip("peft")
    base = transformers.LlamaForCausalLM(_llama_config(transformers))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], **options)
    model = peft.get_peft_model(base, config)
    for name, param in model.named_parameters():  # LoRA B starts at zero: give it a gradient
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    return Output(model), _ids()


def _timm(name: str, **kwargs):
    if "timm" not in sys.modules:  # timm reads torchvision once, at its own import
        with torchvision_stub.stand_in_if_broken():
            _import_or_skip("timm")
    return sys.modules["timm"].create_model(name, pretrained=False, **kwargs)


def _timm_vit():
    model = _timm(
        "vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=HIDDEN, depth=2,
        num_heads=2, num_classes=3,
    )  # fmt: skip
    return model, _images()


def _timm_resnet_gn():
    """One BasicBlock a stage (``x += shortcut``: identity, then strided downsamples),
    GroupNorm through norm_layer (called with device= and dtype=), a deep stem; the last
    norm of each block not zeroed, so every weight has a gradient."""
    model = _timm(
        "resnet18", num_classes=3, layers=(1, 1, 1, 1), channels=(8, 8, 16, 16),
        stem_type="deep", stem_width=4, zero_init_last=False,
        norm_layer=lambda channels, **factory: nn.GroupNorm(2, channels, **factory),
    )  # fmt: skip
    return model, _images(size=32)


def _timm_efficientnet_gn():
    """timm's tiny EfficientNet with GroupNormAct: depthwise convs, squeeze-excitation, inverted
    residuals (as shipped EfficientNet uses BatchNorm, which is refused)."""
    return _timm("test_efficientnet_gn", num_classes=3), _images(size=32)


def _timm_convnext():
    """Blocks of depthwise conv, LayerNorm2d (conv_mlp), 1x1-conv MLP and layer-scale gamma,
    a raw parameter of the block; gamma at 0.5, as timm's 1e-6 leaves the blocks' other
    gradients (about 1e-8) under the oracle's absolute tolerance."""
    model = _timm(
        "convnext_atto", num_classes=3, dims=(8, 8, 8, 8), depths=(1, 1, 1, 1),
        ls_init_value=0.5,
    )  # fmt: skip
    return model, _images(size=32)


def _encoder():
    layer = nn.TransformerEncoderLayer(HIDDEN, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(HIDDEN, 2)
    )
    return model, torch.randn(B, T, HIDDEN, dtype=torch.float64)


def _conv3d():
    model = nn.Sequential(
        nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1, groups=2),
        nn.Tanh(),
        nn.Conv3d(4, 2, 2, bias=False),
        nn.Flatten(),
    )
    return model, torch.randn(B, 2, 4, 5, 4, dtype=torch.float64)


def _conv_transpose2d():
    model = nn.Sequential(
        nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
        nn.Tanh(),
        nn.ConvTranspose2d(4, 2, 2, groups=2),
        nn.Flatten(),
    )
    return model, _images(size=4)


def _instance_prelu():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.InstanceNorm2d(4, affine=True),
        nn.PReLU(4),
        nn.Conv2d(4, 2, 3),
        nn.PReLU(),
        nn.Flatten(),
    )
    return model, _images()


MODELS = {
    "gpt2": _gpt2,
    "gpt2_tied": lambda: _gpt2(tied=True),
    "bert": _bert,
    "llama": _llama,
    "hf_vit": _hf_vit,
    "lora_llama": _lora,
    "dora_llama": lambda: _lora(use_dora=True),
    "t5": _t5,
    "t5_untied": lambda: _t5(tied=False),
    "timm_vit": _timm_vit,
    "timm_resnet18_gn": _timm_resnet_gn,
    "timm_convnext": _timm_convnext,
    "timm_efficientnet_gn": _timm_efficientnet_gn,
    "transformer_encoder": _encoder,
    "conv3d": _conv3d,
    "conv_transpose2d": _conv_transpose2d,
    "instancenorm_prelu": _instance_prelu,
    "local_vit": lambda: (TinyViT(), _images()),
    "local_resnet_gn": lambda: (ResNetGN(), _images()),
    "local_convnext": lambda: (
        nn.Sequential(ConvNeXtBlock(4), nn.Flatten()),
        torch.randn(B, 4, 4, 4, dtype=torch.float64),
    ),
}
AUTOMATIC = ["gpt2", "gpt2_tied", "local_vit", "t5"]
MICRO_BATCHED = ["bert", "local_resnet_gn", "transformer_encoder", "t5", "dora_llama", "gpt2_tied"]
# a weight shared by embeddings and the head: two per_layer layers, one tensor
PER_LAYER_REFUSED_CASES = [("t5", "per_layer"), ("gpt2_tied", "per_layer")]


def _build(name: str):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model = model.double().train()
    with torch.no_grad():
        shape = model(inputs[:1]).shape[1:]
    targets = torch.randn(inputs.shape[0], *shape, dtype=torch.float64)
    return model, inputs, targets


def _check(name: str, mode: str, micro_batch: int | None = None) -> None:
    model, inputs, targets = _build(name)
    expected = oracle_grad_sum(model, inputs, targets, mode, 1.0)
    got = fastdp_grad_sum(model, inputs, targets, mode, 1.0, micro_batch=micro_batch)
    assert_close_sums(got, expected)


CASES = [(name, mode) for name in MODELS for mode in ("flat", "none", "per_layer")]
CASES = [(name, mode) for name, mode in CASES if (name, mode) not in PER_LAYER_REFUSED_CASES]
CASES += [(name, "automatic") for name in AUTOMATIC]


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_model_matches_oracle(name, mode):
    _check(name, mode)


@pytest.mark.parametrize("name", MICRO_BATCHED)
def test_model_micro_batched(name):
    _check(name, "flat", micro_batch=2)  # B = 3: micro-batches of 2 and 1


# ---- refusals --------------------------------------------------------------------------------
def _make_private(model: nn.Module, inputs: torch.Tensor, clipping: str = "flat"):
    loader = DataLoader(TensorDataset(inputs, inputs), batch_size=inputs.shape[0])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return fastdp.PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        clipping=clipping,
        poisson_sampling=False,
    )


@pytest.mark.parametrize("name", [name for name, _ in PER_LAYER_REFUSED_CASES])
def test_tied_head_is_refused_under_per_layer_clipping(name):
    model, inputs = MODELS[name]()
    with pytest.raises(ValueError, match="per_layer.*tied weight.*flat"):
        _make_private(model, inputs, clipping="per_layer")


@pytest.mark.parametrize("layer", [nn.LSTM(4, 4, batch_first=True), nn.GRU(4, 4)])
def test_recurrent_layers_are_refused_with_the_fix(layer):
    with pytest.raises(ValueError, match="recurrent.*requires_grad_\\(False\\)"):
        _make_private(nn.Sequential(layer), torch.randn(B, T, 4))


def test_multihead_attention_with_kdim_is_refused():
    attention = nn.MultiheadAttention(HIDDEN, 2, kdim=4, vdim=4, batch_first=True)
    with pytest.raises(ValueError, match="MultiheadAttention.*kdim = vdim = embed_dim"):
        _make_private(nn.Sequential(attention), torch.randn(B, T, HIDDEN))


def test_norm_subclass_goes_to_the_fallback_not_a_contradiction():
    from fastdp.rules import is_fallback, rule_for

    assert is_fallback(rule_for(GroupNormAct(2, 4)))
    assert is_fallback(rule_for(LayerNorm2d(4)))
    assert not is_fallback(rule_for(nn.GroupNorm(2, 4)))


def test_fallback_refuses_dropout_it_cannot_replay():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return F.dropout(x * self.scale, p=0.5, training=self.training)

    model, optimizer, loader = _make_private(nn.Sequential(Noisy()), torch.randn(B, 4))
    x, _ = next(iter(loader))
    with pytest.raises(RuntimeError, match="dropout"):
        model(x).square().sum().backward()


def test_fallback_warns_when_its_gradients_are_large():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(4))  # 4 of 24 parameters
    with pytest.warns(UserWarning, match="PReLU.*materialised"):
        _make_private(model, torch.randn(B, 4))


# ---- activation checkpointing as transformers ships it ---------------------------------------
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("name", ["llama", "lora_llama", "gpt2", "t5_untied", "dora_llama"])
@pytest.mark.parametrize("mode", ["flat", "per_layer"])
def test_gradient_checkpointing_matches_the_oracle(name, use_reentrant, mode):
    """model.gradient_checkpointing_enable(...) (the LoRA recipe with reentrant checkpoints
    and enable_input_require_grads, or the transformers default): each sample clipped once,
    across the nested backward passes; the oracle runs the same weights without it."""
    model, inputs, targets = _build(name)
    expected = oracle_grad_sum(model, inputs, targets, mode, 1.0)
    inner = model.model
    inner.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
    )
    if use_reentrant:
        inner.enable_input_require_grads()
    got = fastdp_grad_sum(model, inputs, targets, mode, 1.0, micro_batch=2)
    assert_close_sums(got, expected)


def test_dora_on_a_convolution_is_refused_with_the_fix():
    """DoRA on Linear targets is exact (MODELS: dora_llama); on a convolution it is refused,
    naming the fix."""
    peft = _import_or_skip("peft")
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    base(_images().float())
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True)
    model = peft.get_peft_model(base, config)
    with pytest.raises(ValueError, match="DoRA magnitude of an embedding or convolution.*Linear"):
        _make_private(model, _images().float())


def test_lora_on_an_embedding_is_refused_up_front():
    """peft keeps an embedding adapter's factors in ParameterDicts that its parent uses: no
    call to take per-sample gradients from, so refused at make_private (not at step)."""
    transformers = _import_or_skip("transformers")
    peft = _import_or_skip("peft")
    base = transformers.LlamaForCausalLM(_llama_config(transformers))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"])
    model = Output(peft.get_peft_model(base, config))
    with pytest.raises(ValueError, match="lora_embedding_A.*ParameterDict.*parameter container"):
        _make_private(model, _ids())

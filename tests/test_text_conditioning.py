"""Text-conditional VAR (issue 26): the text encoders, the zero-gated cross-attention (equal to the class model at
step 0), training, guidance with the null text and negative prompts, KV-cache sampling, model files, and the emoji
captions. Tiny randomly initialised models; nothing is downloaded."""

import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, T5Config

import varlib
from varlib import VAR, MultiScaleVQVAE, VARConfig
from varlib.data.emoji import emoji_caption, labelled_emoji_files, twemoji_png_dir
from varlib.models.flops import per_token_linear_params
from varlib.models.layers import AdaLNSelfAttn
from varlib.models.patch_schedules import scale_slices
from varlib.models.text import (ByteTokenizer, HFTextEncoder, SmallTextEncoder, TextEncoder, TextFeatures,
                                WordTokenizer, build_text_encoder, drop_words)

PROMPTS = ["red heart", "cat face with wry smile"]


def tiny_vae() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(vocab_size=16, z_channels=4, ch=16, ch_mult=(1, 1), num_res_blocks=1, patch_nums=(1, 2, 3),
                           using_sa=False, using_mid_sa=False, norm_groups=8).eval().requires_grad_(False)


def clip_encoder() -> HFTextEncoder:
    torch.manual_seed(1)
    return HFTextEncoder(config=CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64, vocab_size=300, max_position_embeddings=40))


def t5_encoder() -> HFTextEncoder:
    torch.manual_seed(1)
    return HFTextEncoder(config=T5Config(d_model=24, num_layers=1, num_heads=2, d_kv=12, d_ff=48, vocab_size=300))


def small_encoder(width: int = 16) -> SmallTextEncoder:
    torch.manual_seed(1)
    return SmallTextEncoder(width=width, depth=1, num_heads=2, max_length=32)


def text_var(encoder: TextEncoder, **kwargs) -> VAR:
    torch.manual_seed(2)
    text = dict(type="text", encoder=encoder)
    return VAR(tiny_vae(), VARConfig(depth=2, width=32, num_heads=2, conditioning=text, **kwargs))


def set_gates(var: VAR, value: float) -> None:
    with torch.no_grad():
        for block in var.blocks:
            block.cross_gate.fill_(value)


# -- encoders ---------------------------------------------------------------------------------------------------


def test_byte_tokenizer_ids_and_padding():
    ids, mask = ByteTokenizer(max_length=5)(["ab", "abcdef"])
    assert ids.tolist() == [[257, 98, 99, 258, 0], [257, 98, 99, 100, 258]]  # the second cut to 5 ids, EOS kept
    assert mask.tolist() == [[True] * 4 + [False], [True] * 5]


def test_word_tokenizer_hashes_lower_case_words_and_pads():
    tokenizer = WordTokenizer(buckets=1000, max_length=4)
    ids, mask = tokenizer(["Red heart", "cat face: with wry smile!"])
    red, heart, cat, face = (3 + zlib.crc32(w.encode()) % 1000 for w in ("red", "heart", "cat", "face"))
    assert ids.tolist() == [[1, red, heart, 2], [1, cat, face, 2]]  # the second cut to 4 ids, EOS kept
    assert mask.all() and tokenizer.vocab_size == 1003
    ids, mask = tokenizer(["RED", "red heart"])
    assert ids.tolist() == [[1, red, 2, 0], [1, red, heart, 2]] and mask.tolist() == [[True] * 3 + [False], [True] * 4]
    ids, _ = tokenizer(["Piñata", "猫 face_2"])  # any script; the underscore separates words
    assert ids[0, 1] == 3 + zlib.crc32("piñata".encode()) % 1000 and ids[1, 1:3].tolist() == [
        3 + zlib.crc32("猫".encode()) % 1000, face]
    with pytest.raises(ValueError, match="buckets=0"):
        WordTokenizer(buckets=0)


def test_small_encoder_over_words_gives_one_token_per_word_and_rejects_other_tokens():
    torch.manual_seed(1)
    encoder = SmallTextEncoder(width=16, depth=1, num_heads=2, tokens="words", buckets=64)
    features = encoder.encode(["red heart", "a"])
    assert features.mask_BT.sum(1).tolist() == [4, 3] and encoder.token_embed.num_embeddings == 67
    rebuilt = build_text_encoder(encoder.config)
    rebuilt.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(rebuilt.encode(["red heart"]).pooled_BD, features.pooled_BD[:1])
    with pytest.raises(ValueError, match="'words' or 'bytes', got 'chars'"):
        SmallTextEncoder(tokens="chars")


def test_drop_words_leaves_out_words_at_the_rate_and_keeps_one():
    torch.manual_seed(0)
    prompts = ["cat face with wry smile"] * 2000 + ["heart"]
    dropped = drop_words(prompts, 0.3)
    assert dropped[-1] == "heart"  # one word: kept whatever the draw
    kept = [p.split() for p in dropped[:-1]]
    assert all(words and all(w in prompts[0].split() for w in words) for words in kept)
    assert all(words == sorted(words, key=prompts[0].split().index) for words in kept)  # order kept
    share = sum(map(len, kept)) / (5 * 2000)  # 0.7 kept, plus the rare prompts where all 5 drew "drop" (0.3^5)
    assert share == pytest.approx(0.7 + 0.3**5 / 5, abs=4 * (0.21 / 10000) ** 0.5)
    torch.manual_seed(0)
    assert drop_words(prompts, 0.3) == dropped  # torch's generator: a seeded step draws the same
    assert drop_words(prompts[:5], 0.0) == prompts[:5]


def test_word_dropout_acts_in_training_mode_only_and_travels_in_the_model_file(tmp_path):
    torch.manual_seed(2)
    var = VAR(tiny_vae(), VARConfig(depth=2, width=32, num_heads=2,
              conditioning=dict(type="text", encoder=small_encoder().config, word_dropout=0.5)))
    prompts = ["cat face with wry smile"] * 4
    var.eval()
    torch.testing.assert_close(var.text_cond.prepare(prompts, None, var).pooled_BD,
                               var.text_cond.encoder.encode(prompts).pooled_BD)
    var.train()
    torch.manual_seed(0)
    trained_on = drop_words(prompts, 0.5)
    torch.manual_seed(0)
    torch.testing.assert_close(var.text_cond.prepare(prompts, None, var).pooled_BD,
                               var.text_cond.encoder.encode(trained_on).pooled_BD)
    assert trained_on != prompts
    var.save_pretrained(tmp_path / "m")
    assert varlib.load(tmp_path / "m").text_cond.word_dropout == 0.5
    with pytest.raises(ValueError, match=r"word_dropout must lie in \[0, 1\), got 1.0"):
        VAR(tiny_vae(), VARConfig(depth=2, width=32, num_heads=2,
            conditioning=dict(type="text", encoder=small_encoder().config, word_dropout=1.0)))


def test_small_encoder_shapes_padding_and_trainable():
    encoder = small_encoder()
    features = encoder.encode(["red heart", "a"])
    assert features.tokens_BTD.shape == (2, 11, 16) and features.pooled_BD.shape == (2, 16)
    assert features.mask_BT.sum(1).tolist() == [11, 3]
    torch.testing.assert_close(features.pooled_BD[1], features.tokens_BTD[1, :3].mean(0), rtol=0, atol=1e-6)
    alone = encoder.encode(["a"])  # padding is masked out: a prompt's features do not depend on its batch
    torch.testing.assert_close(alone.tokens_BTD[0], features.tokens_BTD[1, :3], rtol=0, atol=1e-5)
    assert not encoder.frozen and all(p.requires_grad for p in encoder.parameters())
    assert features.pooled_BD.requires_grad


def test_small_encoder_pools_a_bag_of_words_with_or_without_the_features():
    torch.manual_seed(1)
    words = SmallTextEncoder(width=16, depth=1, num_heads=2, max_length=32, tokens="words", pool="words")
    both = build_text_encoder({**words.config, "pool": "features+words"})
    features = build_text_encoder({**words.config, "pool": "features"})
    for encoder in (both, features):
        encoder.load_state_dict(words.state_dict(), strict=False)  # same embeddings, layers and norms
    prompts = ["red heart", "heart red", "red", ""]
    pooled = words.encode(prompts)
    ids_BT, _ = words.tokenize(["red heart"])
    words_D = words.token_embed(ids_BT[0, 1:3]).mean(0)  # without BOS and EOS
    torch.testing.assert_close(pooled.pooled_BD[0], words.pool_norm(words_D), rtol=0, atol=1e-6)
    # word order moves the token features (positions) but not the bag of words
    torch.testing.assert_close(pooled.pooled_BD[1], pooled.pooled_BD[0], rtol=0, atol=1e-6)
    assert not torch.allclose(pooled.tokens_BTD[1, 1:3], pooled.tokens_BTD[0, 1:3], atol=1e-3)
    assert (pooled.pooled_BD[2] - pooled.pooled_BD[0]).abs().max() > 0.1
    assert torch.isfinite(pooled.pooled_BD[3]).all()  # the empty prompt pools BOS and EOS
    # features+words adds the mean of the token features, which the words pool leaves out
    summed = both.encode(prompts)
    torch.testing.assert_close(summed.tokens_BTD, pooled.tokens_BTD, rtol=0, atol=0)
    mean_BD = torch.stack([summed.tokens_BTD[i, summed.mask_BT[i]].mean(0) for i in range(len(prompts))])
    torch.testing.assert_close(summed.pooled_BD, pooled.pooled_BD + mean_BD, rtol=0, atol=1e-5)
    (summed.pooled_BD[0] * torch.linspace(-1, 1, 16)).sum().backward()  # LayerNorm: a plain sum has no gradient
    assert both.token_embed.weight.grad[ids_BT[0, 1:3]].abs().sum(1).min() > 0
    assert features.pool == "features" and features.pool_norm is None
    with pytest.raises(ValueError, match=r"pool must be one of \['features', 'words', 'features\+words'\], got 'max'"):
        SmallTextEncoder(pool="max")


def test_clip_encoder_shapes_frozen_and_eos_pooling():
    encoder = clip_encoder()
    features = encoder.encode(PROMPTS)
    T = len(PROMPTS[1]) + 2
    assert features.tokens_BTD.shape == (2, T, 32) and features.pooled_BD.shape == (2, 32)
    # CLIP pools the EOS token's feature: the last real token of each prompt
    last = features.mask_BT.sum(1) - 1
    assert last.tolist() == [len(PROMPTS[0]) + 1, T - 1]
    torch.testing.assert_close(features.pooled_BD, features.tokens_BTD[torch.arange(2), last], rtol=0, atol=0)
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())
    assert not features.pooled_BD.requires_grad
    encoder.train()
    assert not encoder.model.training  # frozen: stays in eval mode (no dropout) while the VAR trains


def test_t5_encoder_shapes_frozen_and_mean_pooling():
    encoder = t5_encoder()
    features = encoder.encode(PROMPTS)
    assert type(encoder.model).__name__ == "T5EncoderModel" and encoder.dim == 24
    assert features.tokens_BTD.shape == (2, len(PROMPTS[1]) + 2, 24)
    n = len(PROMPTS[0]) + 2
    torch.testing.assert_close(features.pooled_BD[0], features.tokens_BTD[0, :n].mean(0), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("make", [small_encoder, clip_encoder])
def test_encoder_config_rebuilds_the_encoder(make):
    encoder = make()
    rebuilt = build_text_encoder(encoder.config)
    assert type(rebuilt) is type(encoder) and rebuilt.config == encoder.config
    rebuilt.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(rebuilt.encode(PROMPTS).tokens_BTD, encoder.encode(PROMPTS).tokens_BTD, rtol=0, atol=0)


def test_encoder_config_builds_only_text_encoders():
    with pytest.raises(ValueError, match="TextEncoder class"):
        build_text_encoder({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 2})


# -- the zero-gated cross-attention -------------------------------------------------------------------------------


def test_zero_gate_block_equals_the_block_without_cross_attention():
    torch.manual_seed(0)
    plain = AdaLNSelfAttn(32, 32, 2)
    crossed = AdaLNSelfAttn(32, 32, 2, cross_attn_dim=24)
    missing, unexpected = crossed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("cross_attn.", "ln_cross.", "cross_gate")) for k in missing)
    x, cond = torch.randn(3, 5, 32), torch.randn(3, 32)
    context = (torch.randn(3, 4, 24), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool))
    assert torch.equal(crossed(x, cond, context=context), plain(x, cond))
    with torch.no_grad():
        crossed.cross_gate.fill_(1.0)
    assert (crossed(x, cond, context=context) - plain(x, cond)).abs().max() > 1e-3


def test_text_model_with_zero_gates_equals_the_class_model():
    """A text VAR that holds the class model's weights, with one-hot pooled features and the class embedding as
    its pooled projection, computes exactly the class model's logits and samples at step 0, whatever its text tokens."""
    torch.manual_seed(0)
    num_classes = 5
    class_var = VAR(tiny_vae(), VARConfig(depth=2, num_classes=num_classes, width=32, num_heads=2)).eval()
    text = text_var(small_encoder(width=num_classes + 1)).eval()
    missing, unexpected = text.load_state_dict(class_var.state_dict(), strict=False)
    assert unexpected == ["class_emb.weight"]
    assert all(k.startswith("text_cond.") or ".cross_" in k or ".ln_cross." in k for k in missing)
    with torch.no_grad():
        text.text_cond.pooled_proj.weight.copy_(class_var.class_emb.weight.T)
        text.text_cond.pooled_proj.bias.zero_()
        text.text_cond.null_pooled_D.copy_(F.one_hot(torch.tensor(num_classes), num_classes + 1).float())
    labels = torch.tensor([0, 3, 4])
    features = TextFeatures(torch.randn(3, 4, num_classes + 1), torch.ones(3, 4, dtype=torch.bool),
                            F.one_hot(labels, num_classes + 1).float())
    x = torch.randn(3, class_var.L - 1, 4)
    with torch.no_grad():
        assert torch.equal(text(features, x), class_var(labels, x))
    a = text.generate_tokens(features, cfg=2.0, top_k=4, top_p=0.9, seed=0)
    b = class_var.generate_tokens(labels, cfg=2.0, top_k=4, top_p=0.9, seed=0)
    assert all(torch.equal(u, v) for u, v in zip(a.tokens, b.tokens))
    set_gates(text, 1.0)
    with torch.no_grad():
        assert not torch.equal(text(features, x), class_var(labels, x))


# -- the text VAR -------------------------------------------------------------------------------------------------


def test_text_var_forward_shapes_state_and_config():
    var = text_var(small_encoder())
    x = torch.randn(2, var.L - 1, 4)
    assert var(PROMPTS, x).shape == (2, var.L, 16)
    keys = var.state_dict().keys()
    assert "class_emb.weight" not in keys and "text_cond.pooled_proj.weight" in keys
    assert {"blocks.0.cross_gate", "blocks.1.cross_attn.kv.weight", "text_cond.encoder.token_embed.weight"} <= keys
    assert torch.equal(var.blocks[0].cross_gate, torch.zeros(32))  # zero-initialised
    assert var.num_classes == 0 and var.config["num_classes"] == 0
    assert var.config["conditioning"] == dict(type="text", encoder=var.text_cond.encoder.config, cross_attention=True,
                                              word_dropout=0.0)
    pooled_only = VAR(tiny_vae(), VARConfig(depth=2, width=32, num_heads=2,
                      conditioning=dict(type="text", encoder=small_encoder().config, cross_attention=False)))
    assert not any("cross" in k for k in pooled_only.state_dict()) and pooled_only(PROMPTS, x).shape == (2, var.L, 16)
    with pytest.raises(ValueError, match="prompts"):
        var(torch.tensor([0, 1]), x)
    assert var.generate("red heart", batch_size=3, seed=0).shape == (3, 3, 6, 6)
    # N counts what runs on image tokens: the text encoder, pooled projection and cross-attention keys/values do not
    class_var = VAR(tiny_vae(), VARConfig(depth=2, num_classes=3, width=32, num_heads=2))
    assert per_token_linear_params(var) == per_token_linear_params(class_var) + 2 * 2 * (32 * 32 + 32)


def test_attention_implementations_and_activation_checkpointing_agree_for_text():
    var = text_var(small_encoder(), cond_drop_rate=0.0)
    set_gates(var, 1.0)
    x = torch.randn(2, var.L - 1, 4)
    outputs = {}
    for impl, recompute in (("dense", False), ("prefix", False), ("prefix", True)):
        var.attn_impl, var.activation_checkpointing = impl, recompute
        var.zero_grad()
        logits = var.train()(PROMPTS, x)
        logits.square().mean().backward()
        outputs[impl, recompute] = logits.detach(), var.blocks[0].cross_attn.kv.weight.grad.clone()
    reference = outputs["dense", False]
    for logits, grad in outputs.values():
        torch.testing.assert_close(logits, reference[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(grad, reference[1], atol=1e-6, rtol=1e-4)
    assert reference[1].abs().sum() > 0


def test_training_a_tiny_text_var_reduces_the_loss_and_uses_the_prompt():
    """Two prompts, each with its own token maps: 40 AdamW steps bring the loss from ln V to well below, and the
    trained model scores each prompt's tokens better under its own prompt than under the other."""
    var = text_var(small_encoder(), cond_drop_rate=0.1)
    vae = var.vae
    torch.manual_seed(3)
    tokens = [torch.randint(0, 16, (2, pn * pn)) for pn in var.patch_nums]
    x, target = vae.teacher_forcing_input(tokens), torch.cat(tokens, dim=1)

    def loss(prompts):
        return F.cross_entropy(var(prompts, x).flatten(0, 1), target.flatten())

    optimiser = torch.optim.AdamW([p for p in var.parameters() if p.requires_grad], lr=3e-3)
    encoder_before = var.text_cond.encoder.token_embed.weight.clone()
    var.train()
    first = loss(PROMPTS).item()
    for _ in range(40):
        optimiser.zero_grad()
        loss(PROMPTS).backward()
        optimiser.step()
    var.eval()
    with torch.no_grad():
        trained, swapped = loss(PROMPTS).item(), loss(PROMPTS[::-1]).item()
    assert first == pytest.approx(torch.log(torch.tensor(16.0)).item(), abs=0.1)
    assert trained < 0.3 * first, (first, trained)
    # the teacher-forced coarser scales give much away, not the first token: the wrong prompt costs 0.57 nats
    assert swapped > trained + 0.3, (trained, swapped)
    assert not torch.equal(var.text_cond.encoder.token_embed.weight, encoder_before)  # the small encoder trains


def test_text_dropout_swaps_in_the_null_text_at_the_rate():
    var = text_var(small_encoder())
    features = var.prepare_condition(["abc"] * 4000)
    torch.manual_seed(0)
    dropped = var.text_cond.drop(features, 0.3)
    is_null = (dropped.pooled_BD == var.text_cond.null_pooled_D).all(1)
    assert abs(is_null.float().mean().item() - 0.3) < 4 * (0.3 * 0.7 / 4000) ** 0.5
    assert torch.equal(dropped.mask_BT[is_null].sum(1), torch.ones(int(is_null.sum()), dtype=torch.long))
    assert torch.equal(dropped.tokens_BTD[is_null][:, 0], var.text_cond.null_tokens_1D.expand(int(is_null.sum()), -1))
    assert torch.equal(dropped.pooled_BD[~is_null], features.pooled_BD[~is_null])


def test_class_model_negative_classes_replace_the_null_class():
    torch.manual_seed(0)
    var = VAR(tiny_vae(), VARConfig(depth=2, num_classes=4, width=32, num_heads=2)).eval()
    sample = dict(cfg=3.0, top_k=1, top_p=0.0, seed=0)
    plain = var.generate_tokens([0, 1], **sample).tokens
    assert all(torch.equal(a, b) for a, b in zip(plain, var.generate_tokens([0, 1], negative=4, **sample).tokens))
    other = var.generate_tokens([0, 1], negative=[2, 3], **sample).tokens
    assert any(not torch.equal(a, b) for a, b in zip(plain, other))


def greedy_guided_reference(var, prompts, uncond: TextFeatures, tokens, cfg):
    """Per scale, the argmax of the guided teacher-forced logits (1 + t) cond - t uncond, t = cfg k/(K-1)."""
    x = var.vae.teacher_forcing_input(tokens)
    with torch.no_grad():
        cond, free = var(prompts, x), var(uncond, x)
    K = len(var.patch_nums)
    return [((1 + cfg * k / (K - 1)) * cond[:, s] - cfg * k / (K - 1) * free[:, s]).argmax(-1)
            for k, s in enumerate(scale_slices(var.patch_nums))]


def test_guidance_uses_the_null_text_or_the_negative_prompt_as_the_unconditional_branch():
    var = text_var(clip_encoder()).eval()
    set_gates(var, 1.0)  # as after training: the text tokens matter
    with torch.no_grad():
        var.text_cond.null_pooled_D.normal_()
    negative = ["blue square"]
    sample = dict(cfg=3.0, top_k=1, top_p=0.0, seed=0)
    with_null = var.generate_tokens(PROMPTS, **sample)
    with_negative = var.generate_tokens(PROMPTS, negative=negative, **sample)
    null = var.text_cond.null(2)
    negative_features = var.prepare_condition(negative * 2)
    for out, uncond in ((with_null, null), (with_negative, negative_features)):
        reference = greedy_guided_reference(var, PROMPTS, uncond, out.tokens, 3.0)
        assert all(torch.equal(a, b) for a, b in zip(out.tokens, reference))
    assert any(not torch.equal(a, b) for a, b in zip(with_null.tokens, with_negative.tokens))
    # no guidance (cfg 0): the pure conditional path, which neither the null text nor a negative prompt changes
    plain = var.generate_tokens(PROMPTS, cfg=0.0, top_k=1, top_p=0.0, seed=0)
    reference = greedy_guided_reference(var, PROMPTS, null, plain.tokens, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain.tokens, reference))
    assert all(torch.equal(a, b) for a, b in zip(
        plain.tokens, var.generate_tokens(PROMPTS, cfg=0.0, top_k=1, top_p=0.0, seed=0, negative=negative).tokens))
    images = var.generate(PROMPTS, cfg=3.0, seed=0, negative=negative)
    assert images.shape == (2, 3, 6, 6)
    assert not torch.equal(images, var.generate(PROMPTS, cfg=3.0, seed=0))


def test_kv_cache_sampling_logits_match_the_teacher_forced_forward():
    var = text_var(clip_encoder()).eval()
    set_gates(var, 1.0)
    seen = []
    original = var.get_logits

    def spy(h, cond):
        logits = original(h, cond)
        seen.append(logits.clone())  # the sampler masks its logits in place
        return logits

    var.get_logits = spy
    try:
        out = var.generate_tokens(PROMPTS, cfg=0.0, top_k=5, top_p=0.0, seed=3)
    finally:
        del var.get_logits
    with torch.no_grad():
        full = var(PROMPTS, var.vae.teacher_forcing_input(out.tokens))
    torch.testing.assert_close(torch.cat(seen, dim=1), full, atol=1e-5, rtol=0)


def test_compiled_sampler_traces_the_cross_attention_and_equals_the_eager_one():
    """compile="eager": dynamo traces each scale's step (fullgraph: no graph breaks) with the text context."""
    var = text_var(small_encoder()).eval()
    set_gates(var, 1.0)
    sample = dict(cfg=2.0, top_k=5, top_p=0.0, seed=0, negative="blue square")
    compiled = var.generate_tokens(PROMPTS, compile="eager", **sample)
    assert all(torch.equal(a, b) for a, b in zip(compiled.tokens, var.generate_tokens(PROMPTS, **sample).tokens))


def test_editing_with_a_prompt_keeps_the_kept_tokens():
    var = text_var(small_encoder()).eval()
    torch.manual_seed(4)
    images = torch.rand(2, 3, 6, 6) * 2 - 1
    with torch.no_grad():
        kept = var.edit(images, torch.ones(6, 6), "red heart", cfg=2.0, seed=0)
        reconstruction = var.vae.decode_tokens(var.vae.encode_tokens(images)).add(1).mul(0.5)
    torch.testing.assert_close(kept, reconstruction, atol=1e-5, rtol=0)
    with torch.no_grad():
        painted = var.edit(images, torch.zeros(6, 6), ["red heart", "cat face"], cfg=2.0, seed=0,
                           negative="blue square")
    assert painted.shape == (2, 3, 6, 6) and not torch.allclose(painted, kept)


@pytest.mark.parametrize("make", [small_encoder, clip_encoder, t5_encoder])  # T5 ties its input embeddings
def test_save_pretrained_round_trip_of_a_text_var(tmp_path, make):
    var = text_var(make()).eval()
    set_gates(var, 0.5)
    var.save_pretrained(tmp_path)
    for loaded in (VAR.from_pretrained(tmp_path), varlib.load(tmp_path)):
        assert loaded.config == var.config and type(loaded.text_cond.encoder) is type(var.text_cond.encoder)
        assert loaded.state_dict().keys() == var.state_dict().keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in var.state_dict().items())
        encoder = loaded.text_cond.encoder
        assert encoder.frozen == all(not p.requires_grad for p in encoder.parameters())
        assert torch.equal(loaded.generate(PROMPTS, cfg=2.0, seed=0), var.generate(PROMPTS, cfg=2.0, seed=0))
    card = (tmp_path / "README.md").read_text()
    assert "text-conditional" in card and 'var.generate(["red heart", "cat face"], seed=0)' in card


# -- emoji captions ---------------------------------------------------------------------------------------------------


def captioned_emoji_files(directory: Path) -> list[tuple[Path, str, str]]:
    """Sorted `(png_path, caption, category)` triples of the usable emoji (those of `labelled_emoji_files`),
    each captioned by `emoji_caption`; the category is kept for scoring."""
    labelled, _ = labelled_emoji_files(directory)
    return [(path, emoji_caption(path.stem), category) for path, category in labelled]


def test_emoji_captions_from_names_keep_the_category():
    directory = twemoji_png_dir()
    captioned = captioned_emoji_files(directory)
    labelled, _ = labelled_emoji_files(directory)
    assert len(captioned) == len(labelled) == 3808
    assert [(p, c) for p, _, c in captioned] == labelled
    assert all(caption == caption.lower() and caption.strip() for _, caption, _ in captioned)
    by_file = {p.stem: (caption, category) for p, caption, category in captioned}
    assert by_file["2764"] == ("red heart", "Smileys & Emotion")
    assert by_file["1f63c"] == ("cat face with wry smile", "Smileys & Emotion")
    assert by_file["1f7e5"] == ("red square", "Symbols") and by_file["1f534"] == ("red circle", "Symbols")
    assert by_file["1f44b-1f3fd"] == by_file["1f44b"] == ("waving hand sign", "People & Body")  # skin tones: the base
    assert emoji_caption("zzzz") is None
    assert len({caption for _, caption, _ in captioned}) > 1800  # names, not categories

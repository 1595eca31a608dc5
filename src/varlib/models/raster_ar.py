"""The raster-scan next-token baseline of the paper's ablation: a GPT-style decoder over one token map.

It predicts the tokens of a single-scale tokenizer (a :class:`MultiScaleVQVAE` with one patch number) one by
one in row-major order, with everything else taken from VAR: the AdaLN blocks, the class embedding as start
token and AdaLN condition, the null class for classifier-free guidance, the input projection of frozen code
vectors (``word_embed``), the official initialisation, the head and the top-k/top-p filter. At equal depth and
width the two models therefore have exactly the same non-embedding parameters.

Shapes: B batch, L = side^2 tokens, l <= L a prefix, C width, V vocabulary, Cvae code channels.
"""

from __future__ import annotations

import torch

from varlib.models.attention import BlockCausalAttention
from varlib.models.sampling import as_labels, filter_top_k_top_p_
from varlib.models.transformer import AdaLNTransformer, VARConfig
from varlib.models.vqvae import MultiScaleVQVAE


class RasterAR(AdaLNTransformer):
    """Class-conditional next-token transformer over the raster-ordered tokens of a frozen one-scale tokenizer.

    Position 0 reads the class embedding (plus ``pos_start``) and predicts token 0; position t > 0 reads the
    code vector of token t-1 through ``word_embed`` and predicts token t. Training uses a causal mask;
    sampling decodes one token per step with a KV cache.

    Args:
        vae: a tokenizer with a single scale (``patch_nums == (side,)``); held by reference, as in VAR.
        config: the architecture (:class:`~varlib.models.transformer.VARConfig`): class-conditional, without shared
            AdaLN, on the tokenizer's one scale.
    """

    FILE_KIND, FILE_PREFIX = "raster_ar", "ar"

    def __init__(self, vae: MultiScaleVQVAE, config: VARConfig = VARConfig()):
        if len(vae.patch_nums) != 1:
            raise ValueError(
                f"RasterAR needs a single-scale tokenizer (patch_nums of one entry), got patch_nums {vae.patch_nums}"
            )
        conditioning = dict(config.conditioning or {"type": "class"})
        if config.shared_aln or conditioning != {"type": "class"} or config.patch_nums not in (None, vae.patch_nums):
            raise ValueError(f"RasterAR takes neither shared_aln, conditioning nor another patch_nums (VAR's; it is "
                             f"class-conditional on the tokenizer's one scale {vae.patch_nums}), got "
                             f"shared_aln={config.shared_aln}, conditioning={config.conditioning}, "
                             f"patch_nums={config.patch_nums}")
        super().__init__(vae, config, tuple(vae.patch_nums))
        self.side = self.patch_nums[0]
        causal = torch.ones(self.L, self.L, dtype=torch.bool).tril()
        bias = torch.zeros(self.L, self.L).masked_fill_(~causal, float("-inf"))
        self.register_buffer("causal_bias_11LL", bias.view(1, 1, self.L, self.L), persistent=False)

    def embed_tokens(self, tokens_Bl: torch.Tensor) -> torch.Tensor:
        """word_embed of the frozen code vectors: (B,l) token indices -> (B,l,C), in the weights' dtype (fp32, or
        bf16 under FSDP2's bf16 mixed precision)."""
        return self.word_embed(self.vae.quantize.embedding(tokens_Bl).to(self.word_embed.weight.dtype))

    def start_input(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """Position 0's input, the class embedding + pos_start + pos_1LC[0]: (B,D) -> (B,1,C)."""
        return cond_BD.unsqueeze(1) + self.pos_start + self.pos_1LC[:, :1]

    # -- teacher-forced training forward --------------------------------------------------------------

    def forward(self, labels_B: torch.Tensor, tokens_Bl: torch.Tensor) -> torch.Tensor:
        """Next-token prediction with teacher forcing.

        Args:
            labels_B: (B,) classes in [0, num_classes]; in training mode each becomes the null class with
                probability ``cond_drop_rate``.
            tokens_Bl: (B, l) the first l <= L-1 tokens in raster order (int64), the input of positions 1..l.
        Returns:
            (B, l+1, V) logits of tokens 0..l.
        """
        self.check_labels(labels_B)
        B, length = tokens_Bl.shape[0], tokens_Bl.shape[1] + 1
        if tokens_Bl.ndim != 2 or tokens_Bl.dtype != torch.long or length > self.L or labels_B.shape[0] != B:
            raise ValueError(
                f"expected int64 input tokens (B={labels_B.shape[0]}, l <= L-1={self.L - 1}), "
                f"got {tuple(tokens_Bl.shape)} {tokens_Bl.dtype}"
            )
        labels_B = self.drop_condition(labels_B)
        with torch.autocast(device_type=tokens_Bl.device.type, enabled=False):
            cond_BD = self.class_emb(labels_B)
            x_BlC = torch.cat((self.start_input(cond_BD), self.embed_tokens(tokens_Bl) + self.pos_1LC[:, 1:length]), 1)
        # causal = block-causal with one token per block; dense is the only implementation (no scale structure)
        attention = BlockCausalAttention((1,) * self.L, self.causal_bias_11LL, None, length, "dense")
        for block in self.blocks:
            x_BlC = block(x_BlC, cond_BD, attention=attention)
        return self.get_logits(x_BlC, cond_BD)

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 * non-embedding parameters + 12 * depth * C * (mean keys seen, (L+1)/2)."""
        return 6 * self.num_non_embedding_params() + 12 * self.depth * self.width * (self.L + 1) / 2

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_tokens(self, labels, cfg: float | None = None, top_k: int | None = None, top_p: float | None = None,
                        seed: int | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Samples the L tokens one at a time with a KV cache.

        The guided logits are ``(1 + cfg) cond - cfg uncond`` at every position (the unconditional half of the
        batch is skipped when cfg == 0); top-k/top-p filter them; one multinomial draw per step on a private
        generator seeded with ``seed`` (None: the global RNG).

        Args:
            labels: (B,) classes in [0, num_classes] (num_classes = null), a list, or an int with ``batch_size``.
            cfg, top_k, top_p: left out (None), the model's :attr:`sampling`.
        Returns:
            (B, L) int64 tokens in raster order.
        """
        settings = self.sampling.resolve(cfg=cfg, top_k=top_k, top_p=top_p)
        cfg, top_k, top_p = settings["cfg"], settings["top_k"], settings["top_p"]
        labels_B = as_labels(self, labels, batch_size)
        B, device = labels_B.shape[0], labels_B.device
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        guided = cfg != 0
        labels_batch = torch.cat((labels_B, labels_B.new_full((B,), self.num_classes))) if guided else labels_B
        rows = labels_batch.shape[0]
        cond_BD = self.class_emb(labels_batch)
        x_B1C = self.start_input(cond_BD)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x_B1C.dtype
        caches = self.new_kv_caches(rows, dtype)
        tokens_BL = torch.empty(B, self.L, dtype=torch.long, device=device)
        for t in range(self.L):
            for block, cache in zip(self.blocks, caches):
                x_B1C = block(x_B1C, cond_BD, kv_cache=cache)  # the query is the newest token: it may see every key
            logits_BV = self.get_logits(x_B1C, cond_BD)[:, 0]
            if guided:
                logits_BV = (1 + cfg) * logits_BV[:B] - cfg * logits_BV[B:]
            filter_top_k_top_p_(logits_BV, top_k, top_p)
            tokens_BL[:, t] = torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator).squeeze(1)
            if t + 1 < self.L:
                x_B1C = (self.embed_tokens(tokens_BL[:, t:t + 1]) + self.pos_1LC[:, t + 1:t + 2]).repeat(rows // B, 1, 1)
        return tokens_BL

    @torch.no_grad()
    def generate(self, labels, **options) -> torch.Tensor:
        """Class-conditional sampling decoded to (B,3,H,W) images in [0,1]; ``options`` (cfg, top_k, top_p, seed,
        batch_size) as :meth:`generate_tokens`: the sampling settings left out come from :attr:`sampling`."""
        tokens_BL = self.generate_tokens(labels, **options)
        return self.vae.decode_tokens([tokens_BL]).add_(1).mul_(0.5)

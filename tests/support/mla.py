"""Tiny multi-latent-attention fields, and building MLA without Transformer Engine on CPU.

``TINY_MLA``: the latent and head sizes of a 64-wide MLA model (DeepSeek-V3's layout, scaled
down) shared by the tests that build one; ``allow_mla_without_te`` is what the ``mla_on_cpu``
fixture (tests/conftest.py) applies.
"""

from __future__ import annotations

#: Fields of a 64-wide MLA ``MoEModelConfig`` (with ``multi_latent_attention=True``).
TINY_MLA = dict(
    hidden_size=64,
    activation="swiglu",
    kv_lora_rank=32,
    qk_head_dim=16,
    qk_pos_emb_head_dim=8,
    v_head_dim=12,
    yarn_original_max_position_embeddings=16,
)


def allow_mla_without_te(monkeypatch) -> None:
    """Let core 0.16.1 build MLA without Transformer Engine (TELinear is a MagicMock there).

    Test-only: ``MLASelfAttention.__init__`` calls ``isinstance(..., TELinear)``; a plain class
    stands in for the placeholder (see ``pr2_megatron.models.attention._check_mla_buildable``).
    """
    from megatron.core.transformer import multi_latent_attention

    if not isinstance(getattr(multi_latent_attention, "TELinear", None), type):
        monkeypatch.setattr(multi_latent_attention, "TELinear", type("NoTELinear", (), {}))

"""Key maps between the diffusers Wan/VACE layout and the native (original Wan/VACE) layout.

Plain data for :func:`rules.vace.load_vace_weights` (``key_map=``) and
:func:`surgery.lora.load_lora_file`: ordered ``(pattern, replacement)`` pairs applied to
every key in turn; a pattern starting with ``"re:"`` is a regular expression, anything
else a substring. Both tables follow diffusers' ``VACE_TRANSFORMER_KEYS_RENAME_DICT``
(``scripts/convert_wan_to_diffusers.py``):

* ``self_attn``/``cross_attn`` <-> ``attn1``/``attn2`` with ``q,k,v,o`` <-> ``to_q,to_k,to_v,to_out.0``;
* ``ffn.0``/``ffn.2`` <-> ``ffn.net.0.proj``/``ffn.net.2``; block ``modulation`` <-> ``scale_shift_table``;
* the norm swap: native ``norm3`` (the affine cross-attention norm) is diffusers ``norm2``;
* VACE ``before_proj``/``after_proj`` <-> ``proj_in``/``proj_out``. The top-level ``proj_out``
  (native ``head.head``) shares that leaf name, so these rules are anchored to
  ``vace_blocks.K.`` and the head rules to the start of the key.

Keys must have their checkpoint prefix (``model.diffusion_model.``, ``transformer.``)
stripped first, which the loaders do before applying a map.
"""
from __future__ import annotations

# A placeholder no real key contains, for swapping norm2 and norm3 in three steps.
_SWAP = ".__norm_swap__."

DIFFUSERS_TO_NATIVE: tuple[tuple[str, str], ...] = (
    # VACE projections first, anchored, before the generic proj_out -> head.head rule.
    (r"re:^(vace_blocks\.\d+)\.proj_in\.", r"\1.before_proj."),
    (r"re:^(vace_blocks\.\d+)\.proj_out\.", r"\1.after_proj."),
    (r"re:^proj_out\.", "head.head."),
    (r"re:^scale_shift_table$", "head.modulation"),
    (r"re:\.scale_shift_table$", ".modulation"),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".to_out.0.", ".o."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    (".norm2.", _SWAP),
    (".norm3.", ".norm2."),
    (_SWAP, ".norm3."),
)

NATIVE_TO_DIFFUSERS: tuple[tuple[str, str], ...] = (
    (r"re:^(vace_blocks\.\d+)\.before_proj\.", r"\1.proj_in."),
    (r"re:^(vace_blocks\.\d+)\.after_proj\.", r"\1.proj_out."),
    (r"re:^head\.head\.", "proj_out."),
    (r"re:^head\.modulation$", "scale_shift_table"),
    (r"re:\.modulation$", ".scale_shift_table"),
    (r"re:^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"re:^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"re:^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"re:^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"re:^time_projection\.1\.", "condition_embedder.time_proj."),
    (".self_attn.", ".attn1."),
    (".cross_attn.", ".attn2."),
    (r"re:\.(attn[12])\.q\.", r".\1.to_q."),
    (r"re:\.(attn[12])\.k\.", r".\1.to_k."),
    (r"re:\.(attn[12])\.v\.", r".\1.to_v."),
    (r"re:\.(attn[12])\.o\.", r".\1.to_out.0."),
    (".attn2.k_img.", ".attn2.add_k_proj."),
    (".attn2.v_img.", ".attn2.add_v_proj."),
    (".attn2.norm_k_img.", ".attn2.norm_added_k."),
    (".ffn.0.", ".ffn.net.0.proj."),
    (".ffn.2.", ".ffn.net.2."),
    (".norm2.", _SWAP),
    (".norm3.", ".norm2."),
    (_SWAP, ".norm3."),
)

__all__ = ["DIFFUSERS_TO_NATIVE", "NATIVE_TO_DIFFUSERS"]

"""Small Wan-like transformers written the way real projects write them.

Each module is one model family: its own naming, cache layout and code habits (see each
module's docstring), seeded and tiny. Besides the model it exposes what the corpus test
needs: ``build(seed)``, ``new_cache(model)``, ``call(model, cache, chunk, generator)`` for
one streaming chunk, ``output_of(result)``, ``blocks(model)``, and the hand-written VACE
pieces ``vace_block()`` and ``vace_block_call(block, c, args, kwargs)``.
"""

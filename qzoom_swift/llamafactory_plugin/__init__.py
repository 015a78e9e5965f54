"""The LLaMA-Factory wing: model folders (``folder``, ``modeling``), dataset export (``data``), zoom generation for
its HF chat engine (``generation``) and Post-SFT positions (``post_sft``). Nothing here imports ms-swift.

Submodules are imported where used (the ``qzoom`` CLI reads their argument definitions without torch).
"""

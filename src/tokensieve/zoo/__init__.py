"""The embedded video model and its synthetic video question answering.

* :mod:`tokensieve.zoo.synthvid` — seeded 16-frame clips and one-word-answer questions in five
  families (needle, count, order, position, attribute), with a held-out seed range.
* :mod:`tokensieve.zoo.model` — the tiny LLaVA-OneVision architecture (and a Qwen2-VL one,
  ``arch="qwen2-vl"``), its word-level tokenizer and processor, and
  :func:`~tokensieve.zoo.model.load_embedded` for the shipped weights.
* :mod:`tokensieve.zoo.train` — ``python -m tokensieve.zoo.train`` trains it from scratch
  (``--arch qwen2-vl``: the Qwen2-VL one).
* :mod:`tokensieve.zoo.evaluate` — answering and scoring with ``generate``.
* :mod:`tokensieve.zoo.demo` — ``tokensieve demo``.
"""

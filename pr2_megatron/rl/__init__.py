"""The reference RL trainer, one user of the library: GRPO with none / r2 / r3 / pr2 replay.

``train`` (``pr2-train``), ``compare`` (``pr2-compare``), ``config`` (YAML -> dataclasses),
``rollout`` (sampling with the Megatron model), ``grpo``, ``tasks``, ``checkpoint``,
``run_log``. Nothing in the library (``routing``, ``routes``, ``models``, ``runtime``,
``metrics``) imports this package.
"""
